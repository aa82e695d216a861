"""API capacity under an open-loop load: loraforge against a bare FastAPI + SQLite app, same run.

    python bench/api_load.py                          # serve, embedded default, 200 rps, 20 s
    python bench/api_load.py --rate 100 --rate 200 --rate 300
    python bench/api_load.py --backend postgres-redis # PostgreSQL + Redis on 127.0.0.1
    python bench/api_load.py --target api --workers 2 # the API alone, two processes
    git archive OLD src | tar -x -C /tmp/old && python bench/api_load.py --before /tmp/old/src --no-c-server

The driver is open-loop: request *i* is sent at ``start + i / rate`` whether or not earlier ones
have answered (a closed loop would slow down with the server and hide its queueing), from one
``httpx.AsyncClient`` (up to 64 connections) on the same machine as the servers. Latency is
measured from the scheduled send time, so time spent waiting for a connection counts. The
requests cycle over four GETs with a valid key: ``/v1/files``, ``/v1/fine_tuning/jobs``,
``/v1/fine_tuning/jobs/{id}/events`` and ``/v1/models``.

* **baseline**: ``bench/api_baseline_app.py`` — one uvicorn process, sync routes, one SQLite row
  read per request (the key), the same four paths.
* **loraforge**: ``loraforge serve`` (API + worker + engine, the embedded default) or
  ``loraforge api`` alone, on a fresh home, with one org (enterprise plan: no requests/minute
  limit), one uploaded file and one job, cancelled at once (so the lists and the events are not
  empty, and no trainer runs during the measurement).

``--before SRC`` also runs loraforge from another source tree (the code before a change) and
``--no-c-server`` this tree with ``uvloop`` and ``httptools`` hidden (uvicorn on asyncio + h11,
as before they were dependencies), both in the same run.

Each server runs alone while it is measured (3 s of warm-up at the offered rate first; ``serve``
once its engine is up). Prints one
JSON line per (server, rate) and a table with p99 loraforge / p99 baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
PG_ADMIN_URL = os.environ.get("LORAFORGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LORAFORGE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
TRAIN_LINE = (
    '{"messages": [{"role": "user", "content": "Ticket 1: my order has not arrived"}, '
    '{"role": "assistant", "content": "{\\"label\\": \\"refund\\"}"}]}\n'
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early (code {proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Server:
    name: str
    url: str
    key: str
    paths: list[str]
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)


def start_baseline(tmp: Path) -> Server:
    """The bare FastAPI + SQLite app of ``api_baseline_app.py``."""
    sys.path.insert(0, str(BENCH))
    from api_baseline_app import init_db

    db = tmp / "baseline.sqlite"
    key = "sk-bench-" + uuid.uuid4().hex
    init_db(str(db), key)
    port = _free_port()
    env = {**os.environ, "BASELINE_DB": str(db)}
    cmd = [sys.executable, "-m", "uvicorn", "api_baseline_app:app", "--app-dir", str(BENCH)]
    cmd += ["--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health", proc)
    paths = ["/v1/files", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/ftjob-1/events", "/v1/models"]
    return Server("baseline", url, key, paths, proc)


def _postgres_database() -> str:
    import psycopg

    name = f"loraforge_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop_postgres_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _hide_c_server(tmp: Path) -> str:
    """A folder whose ``uvloop`` and ``httptools`` fail to import: uvicorn then runs on asyncio +
    h11, as before they were dependencies."""
    shim = tmp / "no-c-server"
    shim.mkdir(exist_ok=True)
    for name in ("uvloop", "httptools"):
        (shim / f"{name}.py").write_text(f"raise ImportError('{name} hidden by api_load.py')\n")
    return str(shim)


def start_loraforge(
    tmp: Path,
    target: str,
    workers: int,
    backend_env: dict[str, str],
    *,
    src: str | None = None,
    label: str = "",
    c_server: bool = True,
) -> Server:
    """``loraforge serve`` (or ``api``) on a fresh home, seeded with a key, a file and a job.

    ``src``: run the package from that source tree (e.g. ``git archive`` of an older commit).
    """
    port, engine_port = _free_port(), _free_port()
    home = tmp / f"home-{uuid.uuid4().hex[:6]}"
    path = [p for p in (None if c_server else _hide_c_server(tmp), src, os.environ.get("PYTHONPATH")) if p]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "LORAFORGE_HOME": str(home),
        "LORAFORGE_API_PORT": str(port),
        "LORAFORGE_ENGINE_PORT": str(engine_port),
        "HF_HUB_OFFLINE": "1",
        **backend_env,
    }
    if backend_env.get("LORAFORGE_DATABASE_URL", "").startswith("postgresql"):
        env["LORAFORGE_DATABASE_URL"] = _postgres_database()
    cli = [sys.executable, "-m", "loraforge"]
    created = subprocess.run(
        [*cli, "keys", "create", "--org", "bench", "--tier", "enterprise"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip().splitlines()[-1]
    cmd = [*cli, target]
    if workers != 1:
        cmd += ["--api-workers" if target == "serve" else "--workers", str(workers)]
    home.mkdir(parents=True, exist_ok=True)
    log = (home / f"{target}.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health", proc)
    if target == "serve":  # its engine builds the model at start: measure once that is done
        _wait_http(f"http://127.0.0.1:{engine_port}/health", proc)
    headers = {"authorization": f"Bearer {key}"}
    upload = httpx.post(
        f"{url}/v1/files",
        headers=headers,
        files={"file": ("train.jsonl", TRAIN_LINE.encode() * 20)},
        data={"purpose": "fine-tune"},
        timeout=60,
    )
    upload.raise_for_status()
    job = httpx.post(
        f"{url}/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "loraforge/tiny-llama", "training_file": upload.json()["id"]},
        timeout=60,
    )
    job.raise_for_status()
    job_id = job.json()["id"]
    # Cancelled at once: its events stay listable, and no trainer competes for the CPU.
    httpx.post(f"{url}/v1/fine_tuning/jobs/{job_id}/cancel", headers=headers, timeout=60).raise_for_status()
    paths = ["/v1/files", "/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{job_id}/events", "/v1/models"]
    name = f"loraforge {target}{' ' + label if label else ''}{'' if c_server else ' (asyncio+h11)'}"
    return Server(name, url, key, paths, proc, env)


async def _drive(server: Server, rate: float, seconds: float) -> tuple[list[float], int, float]:
    """Open loop: latencies (s) of the 2xx answers, the failure count, and the wall time."""
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    headers = {"authorization": f"Bearer {server.key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=30) as client:

        async def one(path: str, scheduled: float) -> None:
            nonlocal failures
            try:
                response = await client.get(path)
            except httpx.HTTPError:
                failures += 1
                return
            if response.status_code == 200:
                latencies.append(time.perf_counter() - scheduled)
            else:
                failures += 1

        total = int(rate * seconds)
        tasks = []
        start = time.perf_counter()
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(server.paths[i % len(server.paths)], scheduled)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return latencies, failures, wall


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _api_pids(server: Server) -> list[int]:
    """The processes that answer HTTP: the server itself, or ``serve``'s API child, and their
    worker processes (``--workers``)."""
    root = server.proc.pid
    if server.name.startswith("loraforge serve"):
        api = [
            c
            for c in _children(root)
            if b" api" in Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ")
        ]
        root = api[0] if api else root
    return [root, *_children(root)]


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(server: Server, rate: float, seconds: float, warmup: float) -> dict[str, object]:
    """Warm up, then drive ``server`` at ``rate`` for ``seconds``; the summary, with the server's
    CPU time per answered request (less sensitive to other load on the machine than latency)."""
    asyncio.run(_drive(server, rate, warmup))
    pids = _api_pids(server)
    cpu_before, load_before = _cpu_seconds(pids), os.getloadavg()[0]
    latencies, failures, wall = asyncio.run(_drive(server, rate, seconds))
    cpu = _cpu_seconds(pids) - cpu_before
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {
        "server": server.name,
        "offered_rps": rate,
        "achieved_rps": round(len(latencies) / wall, 1),
        "ok": len(latencies),
        "failed": failures,
        "p50_ms": round(pct(50), 1),
        "p90_ms": round(pct(90), 1),
        "p99_ms": round(pct(99), 1),
        "max_ms": round(latencies[-1] * 1000, 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
        "server_cpu_ms_per_request": round(cpu / max(1, len(latencies)) * 1000, 2),
        "load_average": round((load_before + os.getloadavg()[0]) / 2, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, action="append", help="offered requests/s (repeatable)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per rate")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--target", choices=["serve", "api"], default="serve")
    parser.add_argument("--workers", type=int, default=1, help="API processes")
    parser.add_argument("--backend", choices=["embedded", "postgres", "postgres-redis"], default="embedded")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--before",
        metavar="SRC",
        help="also run loraforge from this source folder (a src/ tree), e.g. the code before a change",
    )
    parser.add_argument(
        "--no-c-server", action="store_true", help="also run this tree with uvloop and httptools hidden"
    )
    args = parser.parse_args()
    rates = args.rate or [200.0]
    backend_env: dict[str, str] = {}
    if args.backend.startswith("postgres"):
        backend_env["LORAFORGE_DATABASE_URL"] = "postgresql"  # a fresh database per server
    if args.workers > 1 and args.backend != "postgres-redis":
        # Several API processes share the limits' counters through Redis (loraforge api refuses
        # to start several without).
        backend_env["LORAFORGE_RATE_LIMIT_STORAGE_URL"] = REDIS_URL
    if args.backend == "postgres-redis":
        backend_env["LORAFORGE_BROKER_URL"] = REDIS_URL
    print(
        f"# {platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.2f}, backend {args.backend}, target {args.target}, "
        f"workers {args.workers}",
        flush=True,
    )
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="api-load-") as tmp_name:
        tmp = Path(tmp_name)
        starters = [] if args.no_baseline else [lambda: start_baseline(tmp)]
        if args.before:
            starters.append(
                lambda: start_loraforge(
                    tmp, args.target, 1, backend_env, src=args.before, label="before", c_server=False
                )
            )
        if args.no_c_server:
            starters.append(
                lambda: start_loraforge(tmp, args.target, args.workers, backend_env, c_server=False)
            )
        starters.append(lambda: start_loraforge(tmp, args.target, args.workers, backend_env))
        for start in starters:
            server = start()
            try:
                for rate in rates:
                    result = measure(server, rate, args.seconds, args.warmup)
                    results.append(result)
                    print(json.dumps(result), flush=True)
            finally:
                _stop(server.proc)
                database = server.env.get("LORAFORGE_DATABASE_URL", "")
                if database.startswith("postgresql"):
                    _drop_postgres_database(database)
    columns = "server | offered | achieved | p50 ms | p99 ms | failed | p99 / baseline p99"
    print(f"\n| {columns} | server CPU ms/req | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {r["offered_rps"]: r for r in results if r["server"] == "baseline"}
    for r in results:
        ref = base.get(r["offered_rps"])
        ratio = (
            f"{float(r['p99_ms']) / float(ref['p99_ms']):.2f}"  # type: ignore[arg-type]
            if ref and r is not ref and ref["p99_ms"]
            else "–"
        )
        print(
            f"| {r['server']} | {r['offered_rps']:g} | {r['achieved_rps']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['failed']} | {ratio} | {r['server_cpu_ms_per_request']} | "
            f"{r['load_average']} |"
        )


if __name__ == "__main__":
    main()
