"""Crash-recovery soak: SIGKILL the Celery worker mid-training again and again; every job must
still succeed exactly once, resume from its checkpoints, and end bit-identical to an
uninterrupted run of the same spec (the baseline, measured first in the same run).

    python bench/soak_crash_recovery.py                     # 10 kill cycles, embedded backend
    python bench/soak_crash_recovery.py --cycles 3 --epochs 12
    python bench/soak_crash_recovery.py --database-url postgresql://... --broker-url redis://...

It starts ``loraforge api`` and ``loraforge worker`` as separate processes (``loraforge serve``
exits when a child dies) on a fresh home with a short lease (1 s heartbeat, 6 s timeout), keeps
``--parallel`` jobs in flight, and each cycle waits until every unfinished job is training again,
lets the first one run 1-20 more steps (chosen at random: sometimes before its first epoch
checkpoint, mostly after), SIGKILLs the worker, checks the trainers died with it, and starts a
new worker.

Reported (one JSON line, then a summary):

* **lost**: jobs that did not end ``succeeded`` by the deadline;
* **duplicated**: jobs with more than one registered model or "model created" event, a step
  trained twice in the final metrics, or two trainers alive at once (sampled every 0.2 s);
* **orphans**: trainer processes alive 5 s after their worker was killed;
* **diverged**: jobs whose final training loss differs from the uninterrupted baseline's;
* resumes from a checkpoint vs restarts from step 0 (killed before the first epoch ended),
  and recovery time (kill -> the job's next "Fine-tuning job started" event).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

SYSTEM = "You are a ticket classifier. Reply with JSON only."
ANSWER = '{"label": "refund", "priority": "high", "ok": true}'
TINY = "loraforge/tiny-llama"
FINAL = ("succeeded", "failed", "cancelled")


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trainer_pids() -> dict[str, list[int]]:
    """Live trainer processes by job id (the spec path ``runs/<job>/spec.json`` names the job)."""
    found: dict[str, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "loraforge.trainer" in cmdline and state != "Z":
            spec = next((part for part in cmdline if part.endswith("spec.json")), "")
            found[Path(spec).parent.name].append(int(entry))
    return found


class Service:
    """API + worker processes on one home."""

    def __init__(self, home: Path, extra_env: dict[str, str]) -> None:
        self.home = home
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "LORAFORGE_HOME": str(home),
            "LORAFORGE_API_PORT": str(port),
            "LORAFORGE_ENGINE_PORT": str(free_port()),  # no engine: nothing here chats
            "LORAFORGE_HEARTBEAT_SECONDS": "1",
            "LORAFORGE_LEASE_TIMEOUT_SECONDS": "6",
            "LORAFORGE_REAPER_INTERVAL_SECONDS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **extra_env,
        }
        home.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            [sys.executable, "-m", "loraforge", "keys", "create", "--org", "soak"],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        self.key = out.stdout.strip().splitlines()[-1]
        self.api = self._spawn("api")
        self.worker = self._spawn("worker")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("the API did not come up")

    def _spawn(self, command: str) -> subprocess.Popen[bytes]:
        log = (self.home / f"{command}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "loraforge", command], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def kill_worker(self) -> None:
        self.worker.send_signal(signal.SIGKILL)
        self.worker.wait(10)

    def start_worker(self) -> None:
        self.worker = self._spawn("worker")

    def stop(self) -> None:
        for proc in (self.worker, self.api):
            if proc.poll() is None:
                proc.terminate()
        for proc in (self.worker, self.api):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


class OverlapWatch(threading.Thread):
    """Samples trainer processes; remembers the most ever alive at once for each job."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.most: dict[str, int] = defaultdict(int)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            for job_id, pids in trainer_pids().items():
                self.most[job_id] = max(self.most[job_id], len(pids))


def all_events(client: OpenAI, job_id: str) -> list[Any]:
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))


def last_step(client: OpenAI, job_id: str) -> int:
    page = client.fine_tuning.jobs.list_events(job_id, limit=20)
    return max((e.data["step"] for e in page.data if e.type == "metrics"), default=0)


def wait_final(client: OpenAI, job_id: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    job = client.fine_tuning.jobs.retrieve(job_id)
    while job.status not in FINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job_id)
    return job


def create(client: OpenAI, file_id: str, epochs: int, seed: int) -> str:
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=file_id, seed=seed, hyperparameters={"n_epochs": epochs, "batch_size": 4}
    )
    return job.id


def final_loss(client: OpenAI, job_id: str) -> float:
    data = [e.data for e in all_events(client, job_id) if e.type == "metrics"]
    return float(max(data, key=lambda d: d["step"])["train_loss"])


def runs_started(events: list[Any]) -> int:
    return sum(e.message == "Fine-tuning job started" for e in events)


def training(client: OpenAI, job_id: str, runs_before: int) -> bool:
    """Finished, or a run newer than the last kill has trained at least one step."""
    job = client.fine_tuning.jobs.retrieve(job_id)
    if job.status in FINAL:
        return True
    events = all_events(client, job_id)
    starts = [i for i, e in enumerate(events) if e.message == "Fine-tuning job started"]
    if job.status != "running" or len(starts) <= runs_before:
        return False
    return any(e.type == "metrics" for e in events[starts[-1] :])


def recovery_seconds(events: list[Any], kill_times: list[float]) -> list[int]:
    """For each kill, seconds until the job's next run started (event times are whole seconds)."""
    starts = [e.created_at for e in events if e.message == "Fine-tuning job started"]
    out = []
    for killed in kill_times:
        later = [t for t in starts if t >= int(killed)]
        if later:
            out.append(min(later) - int(killed))
    return out


def audit(
    client: OpenAI, job_id: str, total: int, baseline: float, most_alive: int, kill_times: list[float]
) -> dict[str, Any]:
    job = client.fine_tuning.jobs.retrieve(job_id)
    events = all_events(client, job_id)
    texts = [e.message for e in events]
    steps = sorted(e.data["step"] for e in events if e.type == "metrics")
    models = [m.id for m in client.models.list() if m.id == job.fine_tuned_model]
    resumed = [t for t in texts if t.startswith("Resumed from checkpoint at step ")]
    return {
        "job": job_id,
        "status": job.status,
        "runs": texts.count("Fine-tuning job started"),
        "requeued": sum("stopped responding; re-queued" in t for t in texts),
        "resumed_from": [int(t.split("step ")[1].split("/")[0]) for t in resumed],
        "steps_ok": steps == list(range(1, total + 1)),
        "models": len(models),
        "created_events": sum(t.startswith("New fine-tuned model created") for t in texts),
        "most_trainers_at_once": most_alive,
        "recovery_seconds": recovery_seconds(events, kill_times),
        "final_loss": final_loss(client, job_id) if job.status == "succeeded" else None,
        "same_as_baseline": job.status == "succeeded" and final_loss(client, job_id) == baseline,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=10, help="worker SIGKILLs")
    parser.add_argument("--epochs", type=int, default=16, help="epochs per job (5 steps each)")
    parser.add_argument("--parallel", type=int, default=2, help="jobs kept in flight")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill timing")
    parser.add_argument("--home", type=Path, default=None, help="service home (default: a temp dir)")
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (default: embedded SQLite)")
    parser.add_argument("--broker-url", default="", help="Redis URL (default: filesystem broker)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    home = args.home or Path(tempfile.mkdtemp(prefix="loraforge-soak-"))
    extra = {
        k: v
        for k, v in {
            "LORAFORGE_DATABASE_URL": args.database_url,
            "LORAFORGE_BROKER_URL": args.broker_url,
        }.items()
        if v
    }
    started = time.monotonic()
    service = Service(home, extra)
    watch = OverlapWatch()
    watch.start()
    total = args.epochs * 5
    try:
        client = OpenAI(base_url=f"{service.api_url}/v1", api_key=service.key, max_retries=2, timeout=60)
        file_id = client.files.create(
            file=("train.jsonl", io.BytesIO(training_data())), purpose="fine-tune"
        ).id
        t0 = time.monotonic()
        reference = create(client, file_id, args.epochs, seed=7)
        ref_job = wait_final(client, reference, timeout=600)
        assert ref_job.status == "succeeded", ref_job.error
        baseline = final_loss(client, reference)
        baseline_seconds = time.monotonic() - t0
        print(f"baseline: uninterrupted job in {baseline_seconds:.1f}s, final loss {baseline!r}", flush=True)

        jobs: list[str] = []
        kills: list[dict[str, Any]] = []
        runs: dict[str, int] = {}  # runs started per job when the worker was last killed
        for cycle in range(1, args.cycles + 1):
            active = [j for j in jobs if client.fine_tuning.jobs.retrieve(j).status not in FINAL]
            while len(active) < args.parallel:
                active.append(create(client, file_id, args.epochs, seed=7))
                jobs.append(active[-1])
            deadline = time.monotonic() + 300
            while not all(training(client, j, runs.get(j, 0)) for j in active):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cycle {cycle}: jobs never started training: {active}")
                time.sleep(0.3)
            # Kill 1-20 steps on: sometimes before a job's first epoch checkpoint, mostly after.
            lead = active[0]
            target = min(last_step(client, lead) + rng.randint(1, 20), total - 2)
            while last_step(client, lead) < target and time.monotonic() < deadline:
                if client.fine_tuning.jobs.retrieve(lead).status in FINAL:
                    break
                time.sleep(0.1)
            at_kill = {j: last_step(client, j) for j in active}
            runs = {j: runs_started(all_events(client, j)) for j in jobs}
            killed_at = time.time()
            service.kill_worker()
            orphan_deadline = time.monotonic() + 5
            while any(trainer_pids().get(j) for j in active) and time.monotonic() < orphan_deadline:
                time.sleep(0.1)
            orphans = sum(len(trainer_pids().get(j, [])) for j in active)
            service.start_worker()
            kills.append(
                {
                    "cycle": cycle,
                    "steps_at_kill": at_kill,
                    "orphans": orphans,
                    "at": killed_at,
                    "jobs": active,
                }
            )
            print(f"cycle {cycle}: killed the worker at steps {at_kill}, orphans {orphans}", flush=True)

        results = []
        for job_id in jobs:
            wait_final(client, job_id, timeout=600)
        watch.stopped.set()
        for job_id in jobs:
            kill_times = [k["at"] for k in kills if job_id in k["jobs"]]
            results.append(audit(client, job_id, total, baseline, watch.most.get(job_id, 0), kill_times))
    finally:
        watch.stopped.set()
        service.stop()

    lost = [r["job"] for r in results if r["status"] != "succeeded"]
    duplicated = [
        r["job"]
        for r in results
        if r["models"] > 1 or r["created_events"] > 1 or not r["steps_ok"] or r["most_trainers_at_once"] > 1
    ]
    recoveries = [sec for r in results for sec in r["recovery_seconds"]]
    summary = {
        "cycles": args.cycles,
        "jobs": len(results),
        "interruptions": sum(r["requeued"] for r in results),
        "resumed_from_checkpoint": sum(len(r["resumed_from"]) for r in results),
        "restarted_from_step_0": sum(r["requeued"] - len(r["resumed_from"]) for r in results),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "orphan_trainers": sum(k["orphans"] for k in kills),
        "diverged_from_baseline": sum(
            1 for r in results if r["status"] == "succeeded" and not r["same_as_baseline"]
        ),
        "recovery_seconds_median": statistics.median(recoveries) if recoveries else None,
        "recovery_seconds_max": max(recoveries, default=None),
        "baseline_job_seconds": round(baseline_seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "steps_per_job": total,
        "home": str(home),
    }
    for r in results:
        print(json.dumps(r))
    print(json.dumps(summary))
    ok = (
        not lost
        and not duplicated
        and not summary["orphan_trainers"]
        and not summary["diverged_from_baseline"]
    )
    print(
        f"{summary['jobs']} jobs, {summary['interruptions']} interruptions "
        f"({summary['resumed_from_checkpoint']} resumed from a checkpoint, "
        f"{summary['restarted_from_step_0']} from step 0): {summary['lost']} lost, "
        f"{summary['duplicated']} duplicated, "
        f"{summary['orphan_trainers']} orphan trainers, {summary['diverged_from_baseline']} diverged "
        f"from the uninterrupted baseline — {'OK' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
