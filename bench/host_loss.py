"""Host loss and cold adapter loads with the object store (issue 12): what a cluster pays.

    python bench/host_loss.py                 # moto's S3 server on loopback, SQLite + filesystem broker
    python bench/host_loss.py --runs 3 --database-url postgresql://... --broker-url redis://...

Machines are processes on their own homes sharing only the database, the broker and the object
store (moto's S3 server, started here). Two measurements, each against a baseline taken in the
same run:

1. **Host loss -> running again.** Worker A trains a tiny-llama job until its epoch-2 checkpoint is
   in the store, then is SIGKILLed and its home deleted; standby worker B (its own, empty home)
   takes the job over. Reported, from the kill: when the reaper re-queued the job (lease timeout
   + reaper interval), when B held its lease (pickup), how long B took to fetch the checkpoint
   from the store (the worker's own event), and when B's trainer logged its first new step. The
   baseline is the same job's first start on A (queued -> first step) with nothing to fetch.
2. **Cold adapter load.** An engine on a fresh home (warmed up by one base-model request) loads
   the job's adapter from the store (fetch, check the sha256 of every file, PEFT load) and streams
   its first token; baseline: the same load from the engine's warm cache (unload, load again), then
   a request to the resident adapter. ``--load-repeats`` times each (the cache emptied before each
   cold load); medians, and the ratios cold/warm, are printed.

Prints one JSON line per run and a summary. The lease settings are short (heartbeat 1 s, lease
timeout 6 s, reaper every 1 s) so a run takes about a minute; with the defaults (5 s, 60 s,
10 s) detection takes about 60-70 s and the other parts are unchanged.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

SYSTEM = "You are a ticket classifier. Reply with JSON only."
ANSWER = '{"label": "refund", "priority": "high", "ok": true}'
TINY = "loraforge/tiny-llama"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def training_data(n: int = 20) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Ticket {i}: my order has not arrived"},
                {"role": "assistant", "content": ANSWER},
            ]
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class Machines:
    """Processes on their own homes under ``root``; shared: database, broker, object store."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env, self.procs = root, env, {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "loraforge", *args],
                env={**self.env, "LORAFORGE_HOME": str(home)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.procs[name]

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "loraforge", *args],
            env={**self.env, "LORAFORGE_HOME": str(self.root / "admin")},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_http(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def events(client: OpenAI, job_id: str) -> list[Any]:
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))


def wait_for(predicate: Any, timeout: float, poll: float = 0.05) -> float:
    """Monotonic time at which ``predicate()`` first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(poll)
    raise SystemExit("timed out")


def first_token(engine_url: str, key: str, model: str) -> float:
    """Seconds from sending a streamed chat request to its first content token."""
    body = {"model": model, "messages": [{"role": "user", "content": "Ticket 3"}], "stream": True}
    start = time.monotonic()
    with httpx.stream(
        "POST", f"{engine_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.monotonic() - start
    raise SystemExit("no token")


def one_run(args: argparse.Namespace, s3_env: dict[str, str], root: Path) -> dict[str, Any]:
    engine_port, api_port = free_port(), free_port()
    env = {
        **os.environ,
        **s3_env,
        "LORAFORGE_STORAGE_URL": f"s3://bench-{uuid.uuid4().hex[:10]}/store",
        "LORAFORGE_DATABASE_URL": args.database_url or f"sqlite:///{root / 'shared.sqlite'}",
        "LORAFORGE_BROKER_URL": args.broker_url or f"filesystem://{root / 'broker'}",
        "LORAFORGE_TRAIN_POOLS": json.dumps([{"name": "cpu", "device": "cpu", "count": 1, "memory_gib": 16}]),
        "LORAFORGE_ENGINES": json.dumps({TINY: [f"http://127.0.0.1:{engine_port}"]}),
        "LORAFORGE_ENGINE_PORT": str(engine_port),
        "LORAFORGE_ENGINE_API_KEY": "bench-key",
        "LORAFORGE_HEARTBEAT_SECONDS": "1",
        "LORAFORGE_LEASE_TIMEOUT_SECONDS": str(args.lease_timeout),
        "LORAFORGE_REAPER_INTERVAL_SECONDS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    machines = Machines(root, env)
    try:
        key = machines.cli("keys", "create", "--org", "bench")
        machines.start("api", "api", "--port", str(api_port))
        machines.start("worker-a", "worker")
        wait_http(f"http://127.0.0.1:{api_port}/health")
        client = OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key=key, max_retries=0)
        file_id = client.files.create(file=("t.jsonl", io.BytesIO(training_data())), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(
            model=TINY, training_file=file_id, seed=3, hyperparameters={"n_epochs": args.epochs}
        )

        def status() -> str:
            return client.fine_tuning.jobs.retrieve(job.id).status

        def steps() -> list[int]:
            return [e.data["step"] for e in events(client, job.id) if e.type == "metrics"]

        queued_at = wait_for(lambda: status() in ("queued", "running"), 120)
        first_step_a = wait_for(lambda: bool(steps()), 240)

        def checkpointed() -> bool:
            return any(c.step_number >= 10 for c in client.fine_tuning.jobs.checkpoints.list(job.id))

        wait_for(checkpointed, 240, poll=0.1)
        machines.start("worker-b", "worker")  # the standby, ready before A dies
        time.sleep(3)
        machines.procs["worker-a"].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        machines.procs["worker-a"].wait(20)
        shutil.rmtree(root / "worker-a", ignore_errors=True)
        last = max(steps())
        requeued = wait_for(lambda: status() == "queued", 120)
        running = wait_for(lambda: status() == "running", 120)
        fetch = wait_for(
            lambda: any(e.message.startswith("Fetched the checkpoint") for e in events(client, job.id)), 120
        )
        fetched = next(e for e in events(client, job.id) if e.message.startswith("Fetched the checkpoint"))
        resumed_step = fetched.data["step"]

        def trained_again() -> bool:
            """A metrics event after B's "Resumed from checkpoint" (A's old ones come before it)."""
            evs = events(client, job.id)
            marks = [i for i, e in enumerate(evs) if e.message.startswith("Resumed from checkpoint")]
            return bool(marks) and any(e.type == "metrics" for e in evs[marks[-1] + 1 :])

        training = wait_for(trained_again, 240)
        done = client.fine_tuning.jobs.retrieve(job.id)
        while done.status not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.3)
            done = client.fine_tuning.jobs.retrieve(job.id)
        assert done.status == "succeeded", done.error

        # 2. Cold adapter load on an engine with a fresh home.
        engine_url = f"http://127.0.0.1:{engine_port}"
        machines.start("engine", "engine")
        wait_http(f"{engine_url}/health")
        auth = {"Authorization": "Bearer bench-key"}
        name, ref = done.fine_tuned_model, f"adapters/{job.id}"
        body = {"lora_name": name, "lora_path": ref}
        warmup = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        # The engine's first generation warms it up; the cold measurement is the adapter's alone.
        httpx.post(f"{engine_url}/v1/chat/completions", json=warmup, headers=auth, timeout=120)
        cache = root / "engine" / "cache" / "dirs" / ref

        def load() -> float:
            start = time.monotonic()
            answer = httpx.post(f"{engine_url}/v1/load_lora_adapter", json=body, headers=auth, timeout=120)
            assert answer.status_code == 200, answer.text
            return time.monotonic() - start

        def unload() -> None:
            httpx.post(
                f"{engine_url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=auth, timeout=60
            )

        cold, warm, resident = [], [], []
        for _ in range(args.load_repeats):
            # Cold: the engine's cache of the store is emptied first (fetch + check + PEFT load).
            unload()
            shutil.rmtree(cache, ignore_errors=True)
            (cache.parent / f"{cache.name}.sealed.json").unlink(missing_ok=True)
            took = load()
            cold.append((took, took + first_token(engine_url, "bench-key", name)))
            # Warm: the same from the engine's cache (the seal is still read from the store).
            unload()
            took = load()
            warm.append((took, took + first_token(engine_url, "bench-key", name)))
            resident.append(first_token(engine_url, "bench-key", name))
        # The fetch + checksum step alone, as the engine runs it (its code, in this process).
        os.environ.update(s3_env)
        from loraforge.storage import BlobStore, LocalCache

        store = BlobStore(env["LORAFORGE_STORAGE_URL"])
        fetch_cold, fetch_warm = [], []
        for i in range(args.load_repeats):
            local = LocalCache(store, root / f"fetch-{i}")
            start = time.monotonic()
            local.directory(ref)
            fetch_cold.append(time.monotonic() - start)
            start = time.monotonic()
            local.directory(ref)
            fetch_warm.append(time.monotonic() - start)
        cold_load, cold_ttft = (statistics.median(x[i] for x in cold) for i in (0, 1))
        warm_load, warm_ttft = (statistics.median(x[i] for x in warm) for i in (0, 1))
        resident_ttft = statistics.median(resident)
        adapter_bytes = sum(p.stat().st_size for p in cache.iterdir())
        return {
            "backend": ("postgres" if args.database_url else "sqlite")
            + ("-redis" if args.broker_url else "-filesystem")
            + "-s3",
            "lease_timeout_setting_s": args.lease_timeout,
            "killed_at_step": last,
            "resumed_from_step": resumed_step,
            "detect_s": round(requeued - killed, 2),
            "pickup_s": round(running - requeued, 2),
            "checkpoint_fetch_s": round(fetched.data["seconds"], 3),
            "checkpoint_bytes": fetched.data["bytes"],
            "running_again_s": round(running - killed, 2),
            "first_new_step_s": round(training - killed, 2),
            "trainer_restart_s": round(training - fetch, 2),
            "baseline_first_start_s": round(first_step_a - queued_at, 2),
            "adapter_bytes": adapter_bytes,
            "fetch_cold_s": round(statistics.median(fetch_cold), 4),
            "fetch_warm_s": round(statistics.median(fetch_warm), 4),
            "cold_load_s": round(cold_load, 3),
            "warm_load_s": round(warm_load, 3),
            "cold_first_token_s": round(cold_ttft, 3),
            "warm_first_token_s": round(warm_ttft, 3),
            "resident_first_token_s": round(resident_ttft, 3),
        }
    finally:
        machines.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lease-timeout", type=float, default=6.0)
    parser.add_argument("--load-repeats", type=int, default=5, help="cold/warm adapter loads per run")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--broker-url", default="")
    args = parser.parse_args()
    moto = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    server = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    s3_env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    results = []
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 60, poll=0.2)
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="lf-hostloss-") as tmp:
                result = one_run(args, s3_env, Path(tmp))
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        server.terminate()
        server.wait(10)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in results)

    print(
        f"\nhost loss -> running again on B: {med('running_again_s'):.2f} s median "
        f"(detect {med('detect_s'):.2f} s with a {args.lease_timeout:g} s lease timeout, "
        f"pickup {med('pickup_s'):.2f} s, checkpoint fetch {med('checkpoint_fetch_s'):.3f} s); "
        f"first new step {med('first_new_step_s'):.2f} s after the kill "
        f"(trainer restart {med('trainer_restart_s'):.2f} s; baseline first start on A "
        f"{med('baseline_first_start_s'):.2f} s)"
    )
    print(
        f"adapter fetch + checksums (the engine's code): cold {med('fetch_cold_s'):.4f} s vs cache hit "
        f"{med('fetch_warm_s'):.4f} s (x{med('fetch_cold_s') / med('fetch_warm_s'):.1f})"
    )
    print(
        f"adapter ({med('adapter_bytes') / 1e3:.0f} kB) to first token: cold from the store "
        f"{med('cold_first_token_s'):.3f} s vs warm cache {med('warm_first_token_s'):.3f} s "
        f"(x{med('cold_first_token_s') / med('warm_first_token_s'):.2f}); load alone "
        f"{med('cold_load_s'):.3f} s vs {med('warm_load_s'):.3f} s "
        f"(x{med('cold_load_s') / med('warm_load_s'):.2f}); resident {med('resident_first_token_s'):.3f} s"
    )


if __name__ == "__main__":
    main()
