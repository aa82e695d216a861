"""Throughput and peak memory of the training-data pre-flight (validator + token counter) against a
naive baseline, measured in the same run on the same generated file.

    python bench/validate_throughput.py                 # ~100 MB file, tiny-llama tokenizer
    python bench/validate_throughput.py --mb 20 --baseline-mb 5

* **loraforge**: ``loraforge.preflight.validate_for_model`` — one streaming pass: UTF-8 / JSON /
  schema checks on every line, Jinja rendering of the catalog chat template, exact token counts
  (cached byte-level pre-tokens, sampled against the Rust ``tokenizers`` encoding),
  assistant-token accounting, truncation at the model's limit; a file over 24 MB is split over
  one process per core, as the worker, the dry run and ``loraforge validate`` do.
* **naive**: ``json.loads`` per line, then ``transformers``' ``apply_chat_template(tokenize=True,
  return_assistant_tokens_mask=True)`` per example (what a training script does), over the first
  ``--baseline-mb`` of the same file (it is slow; its MB/s is what matters).

Each variant runs in its own child process so its peak RSS (``ru_maxrss``) is its own.
Prints one JSON line per variant and a summary with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "loraforge/tiny-llama"
_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no what up out "
    "who them some could into its then two more these about than do can only other new time may now "
    "like our over such man me even most made after also did many before must through years where "
    "much way well down should because each just order refund shipping invoice account password "
    "delivery package customer support ticket payment card bank return exchange damaged late status "
    "update address email phone warranty subscription plan billing cancel please thanks hello sorry "
    "help issue problem question answer reply classify priority high low medium urgent"
).split()
_SYSTEMS = [
    "You are a helpful customer-support assistant. Answer briefly and politely.",
    "You are a ticket classifier. Reply with JSON only.",
    "You are an expert technical writer. Explain clearly, with examples where useful.",
]


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", "."])


def _paragraphs(rng: random.Random, n_sentences: int) -> str:
    out, para = [], []
    for _ in range(n_sentences):
        para.append(_sentence(rng, 5, 22))
        if rng.random() < 0.25:
            out.append(" ".join(para))
            para = []
    out.append(" ".join(para))
    return "\n\n".join(p for p in out if p)


def _example(rng: random.Random, i: int) -> dict:
    messages: list[dict] = [{"role": "system", "content": rng.choice(_SYSTEMS)}]
    for turn in range(rng.choice([1, 1, 1, 2, 3])):
        user = f"Ticket {i}-{turn}: " + _paragraphs(rng, rng.randint(1, 4))
        messages.append({"role": "user", "content": user})
        if rng.random() < 0.1:
            answer: dict = {
                "role": "assistant",
                "content": [{"type": "text", "text": _paragraphs(rng, rng.randint(1, 6))}],
            }
        else:
            answer = {"role": "assistant", "content": _paragraphs(rng, rng.randint(1, 8))}
        if turn == 0 and rng.random() < 0.2:
            answer["weight"] = 0
        messages.append(answer)
    return {"messages": messages}


def generate(path: Path, megabytes: float, seed: int = 7) -> int:
    """Write ~``megabytes`` MB of chat JSONL to ``path``; return the example count."""
    rng = random.Random(seed)
    target, size, n = int(megabytes * 1e6), 0, 0
    with path.open("w", encoding="utf-8") as out:
        while size < target:
            line = json.dumps(_example(rng, n), ensure_ascii=False) + "\n"
            out.write(line)
            size += len(line.encode())
            n += 1
    return n


def _cpu() -> float:
    """CPU seconds used so far by this process and its finished children (the workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _run_loraforge(path: Path, home: Path) -> dict:
    from loraforge.catalog import load_catalog
    from loraforge.preflight import validate_for_model
    from loraforge.preflight.parallel import workers_for

    entry = load_catalog().get(MODEL)
    assert entry is not None
    start, cpu = time.perf_counter(), _cpu()
    with path.open("rb") as fh:
        # As the worker, the dry run and the CLI call it: a large local file goes to one process per core.
        report = validate_for_model(fh, entry, home / "models", path=path)
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    assert report.tokens is not None
    return {
        "bytes": report.n_bytes,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "examples": report.n_examples,
        "errors": report.errors.total,
        "total_tokens": report.tokens.total_tokens,
        "trained_tokens": report.tokens.trained_tokens,
        "workers": workers_for(path.stat().st_size),
        "torch_loaded": "torch" in sys.modules,
    }


def _run_naive(path: Path, home: Path, limit_bytes: int) -> dict:
    from loraforge.catalog import load_catalog
    from loraforge.catalog.loading import load_tokenizer

    entry = load_catalog().get(MODEL)
    assert entry is not None
    tokenizer = load_tokenizer(entry, home / "models")
    start, cpu = time.perf_counter(), _cpu()
    n_bytes = n = total = trained = 0
    with path.open("rb") as fh:
        for raw in fh:
            if n_bytes >= limit_bytes:
                break
            n_bytes += len(raw)
            example = json.loads(raw)
            chat = []
            for m in example["messages"]:
                content = m["content"]
                if isinstance(content, list):
                    content = "\n".join(part["text"] for part in content)
                chat.append({"role": m["role"], "content": content})
            enc = tokenizer.apply_chat_template(
                chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = enc["input_ids"][: entry.max_seq_length]
            total += len(ids)
            trained += sum(enc["assistant_masks"][: entry.max_seq_length])
            n += 1
    return {
        "bytes": n_bytes,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": _cpu() - cpu,
        "examples": n,
        "total_tokens": total,
        # Assistant-mask tokens (weight 0 not cleared: the naive loop does not read weights).
        "assistant_tokens": trained,
    }


def _child(args: argparse.Namespace) -> None:
    home = Path(args.home)
    if args.child == "loraforge":
        result = _run_loraforge(Path(args.file), home)
    else:
        result = _run_naive(Path(args.file), home, int(args.baseline_mb * 1e6))
    # On a shared machine MB per CPU-second is steadier than MB/s, which depends on what else runs.
    result["mb_per_cpu_second"] = result["bytes"] / 1e6 / result["cpu_seconds"]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # ru_maxrss of RUSAGE_CHILDREN is the largest single worker; all of them at once is at most
    # workers x that, on top of this process.
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    workers = int(result.get("workers", 1)) if child else 0
    result["peak_rss_mb"] = own + workers * child
    result["process_peak_rss_mb"], result["worker_peak_rss_mb"] = own, child
    result["mb_per_s"] = result["bytes"] / 1e6 / result["seconds"]
    print(json.dumps({"variant": args.child, **result}))


def _spawn(variant: str, file: Path, home: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--file",
        str(file),
        "--home",
        str(home),
        "--baseline-mb",
        str(args.baseline_mb),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = out.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=100.0, help="size of the generated file (MB)")
    parser.add_argument("--baseline-mb", type=float, default=10.0, help="MB the naive baseline reads")
    parser.add_argument("--file", help="validate this file instead of generating one")
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["loraforge", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        home = Path(tmp)
        file = Path(args.file) if args.file else home / "train.jsonl"
        if not args.file:
            start = time.perf_counter()
            n = generate(file, args.mb)
            print(
                f"generated {file.stat().st_size / 1e6:.1f} MB, {n} examples in "
                f"{time.perf_counter() - start:.1f} s",
                flush=True,
            )
        ours = _spawn("loraforge", file, home, args)
        naive = _spawn("naive", file, home, args)
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "loraforge_mb_per_s": round(ours["mb_per_s"], 2),
        "loraforge_peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "naive_mb_per_s": round(naive["mb_per_s"], 2),
        "naive_peak_rss_mb": round(naive["peak_rss_mb"], 1),
        "speedup": round(ours["mb_per_s"] / naive["mb_per_s"], 1),
        "loraforge_mb_per_cpu_second": round(ours["mb_per_cpu_second"], 2),
        "naive_mb_per_cpu_second": round(naive["mb_per_cpu_second"], 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
