"""The trainer's data path before and after issue 14, on generated chat files (tiny-llama tokenizer).

    PYTHONPATH=src python bench/data_pipeline.py --sizes 100            # old and new, 100 MB
    PYTHONPATH=src python bench/data_pipeline.py --sizes 1000 --old-max-mb 0   # new only, 1 GB

Each size: a chat JSONL of that many MB is generated once (seeded; short support chats of one to
three turns, ~1.7 KB and ~500 tokens each, like the issue's 100 MB file of 57k conversations) in
``--workdir``. Then the real trainer (``loraforge.trainer.recipe.train``, one process, CPU, n_epochs
1, batch_size 8) runs in a child process until its first ``metrics`` event, when the pause file
is written and it stops at its pause checkpoint:

* ``old``: the child replaces the data phase with the path that was on main before this change,
  kept below (``Path.read_text`` of the whole file, ``json.loads`` per line, one
  ``apply_chat_template(return_assistant_tokens_mask=True)`` per example into Python int lists);
* ``new``: the trainer as it is (Arrow on disk, batched tokenization in ``num_proc`` processes,
  memory-mapped rows), with a fresh data directory;
* ``resume``: the ``new`` run again on the same data directory and checkpoints: the cache hit.

Reported per run: seconds from the child's start to the first metrics event (``first_step_s``),
data preparation seconds (``prep_s``), CPU seconds of the run (``cpu_s``, workers included),
the trainer process's peak RSS (``VmHWM``) and the peak of the summed PSS of its process tree
(tokenizing workers included; PSS, because forked workers share pages with the trainer), sampled
every 0.1 s.
Prints one JSON line per run and a final ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TINY = "loraforge/tiny-llama"
WORDS = (
    "order parcel refund invoice account password delivery warehouse courier address payment card "
    "subscription upgrade cancel shipping tracking number damaged missing item exchange receipt "
    "discount coupon voucher balance statement support agent ticket status update weekend monday "
    "tomorrow yesterday please thanks kindly urgent again still never always arrived broken wrong"
).split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def generate(path: Path, megabytes: int, seed: int = 1) -> int:
    """Write a chat JSONL of about ``megabytes`` MB; returns the number of examples.

    Messages are drawn from a seeded pool of 4,000 user and 4,000 assistant texts, so a 1 GB file
    takes seconds to write; every conversation is a new combination of one to three turns.
    """
    rng = random.Random(seed)
    users = [json.dumps(_text(rng, rng.randint(20, 90))) for _ in range(4000)]
    answers = [json.dumps(_text(rng, rng.randint(30, 140))) for _ in range(4000)]
    head = '{"messages": [{"role": "system", "content": "You are a helpful support agent."}'
    target, written, n = megabytes * 1_000_000, 0, 0
    tmp = path.with_suffix(".partial")
    with tmp.open("w") as fh:
        while written < target:
            lines = []
            for _ in range(1000):
                turns = "".join(
                    f', {{"role": "user", "content": {rng.choice(users)}}}'
                    f', {{"role": "assistant", "content": {rng.choice(answers)}}}'
                    for _ in range(rng.randint(1, 3))
                )
                lines.append(head + turns + "]}\n")
            chunk = "".join(lines)
            fh.write(chunk)
            written += len(chunk)
            n += len(lines)
    tmp.rename(path)
    return n


# --------------------------------------------------------------------------- the old path (main)


def old_read_and_tokenize(path: str, tokenizer: Any, max_seq_length: int) -> list[Any]:
    """Main's data phase before issue 14: the whole file in memory, one template call per example."""
    from loraforge.trainer.data import IGNORE_INDEX, TokenizedExample, _validate_example

    examples = [
        _validate_example(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()
    ]
    out = []
    for example in examples:
        chat = [{k: v for k, v in m.items() if k != "weight"} for m in example["messages"]]
        enc = tokenizer.apply_chat_template(
            chat, tools=example["tools"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        labels = [tok if bit else IGNORE_INDEX for tok, bit in zip(ids, mask, strict=True)]
        out.append(TokenizedExample(input_ids=ids[:max_seq_length], labels=labels[:max_seq_length]))
    return out


def _child(mode: str, spec_path: str) -> None:
    """Run the trainer until its first metrics event (then pause); print the events."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from loraforge.contracts.train_spec import load_spec
    from loraforge.trainer import recipe

    spec = load_spec(spec_path)
    if mode == "old":

        def old_prepare(spec: Any, tokenizer: Any, max_len: int, cache_root: Path, emit: Any) -> Any:
            started = time.monotonic()
            train = old_read_and_tokenize(spec.training_file, tokenizer, max_len)
            print(json.dumps({"type": "old_prep", "seconds": time.monotonic() - started}), flush=True)
            return _ListExamples(train), _ListExamples([])

        recipe._prepare_files = old_prepare  # type: ignore[assignment]

    def emit(event: Any) -> None:
        print(event.to_line(), flush=True)
        if event.type == "metrics" and spec.pause_file:
            Path(spec.pause_file).touch()

    recipe.train(spec, emit)


class _ListExamples(list):  # type: ignore[type-arg]
    """The old path's examples, with the two counts the recipe now reads from Arrow columns."""

    def n_label_tokens(self) -> int:
        return sum(ex.n_label_tokens for ex in self)


# --------------------------------------------------------------------------- the parent


def _tree_pss(proc: psutil.Process) -> int:
    """Summed PSS of the process and its descendants: the tokenizing workers are forked from the
    trainer, so their RSS counts the pages they share with it again; PSS splits those pages."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, psutil.Error):
            pass
    return total


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_trainer(mode: str, spec_path: Path) -> dict[str, Any]:
    """One child run; returns its timings and memory peaks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    proc = psutil.Process(child.pid)
    peak_tree = peak_main = 0
    first_step = prep = None
    cached = False
    import threading

    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_tree, peak_main
        while not stop.is_set():
            peak_tree = max(peak_tree, _tree_pss(proc))
            peak_main = max(peak_main, _hwm(child.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert child.stdout is not None
    for line in child.stdout:
        event = json.loads(line)
        if event["type"] == "old_prep":
            prep = event["seconds"]
        elif event["type"] == "data_progress" and event["fraction"] >= 1:
            prep, cached = event["elapsed_s"], event["cached"]
        elif event["type"] == "metrics" and first_step is None:
            first_step = time.monotonic() - started
    child.wait()
    stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "mode": mode,
        "first_step_s": round(first_step or -1, 2),
        "prep_s": round(prep or -1, 2),
        # CPU seconds of the trainer and its tokenizing workers, start to exit (the pause
        # checkpoint included): what the run costs whatever else the machine is doing.
        "cpu_s": round(cpu, 1),
        "cache_hit": cached,
        "peak_rss_trainer_mib": round(peak_main / 2**20),
        "peak_pss_tree_mib": round(peak_tree / 2**20),
        "exit": child.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100", help="file sizes in MB, comma-separated")
    parser.add_argument("--old-max-mb", type=int, default=100, help="run the old path up to this size")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loraforge-bench-data"))
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    from loraforge.catalog.catalog import load_catalog
    from loraforge.catalog.loading import resolve_weights

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models"
    resolve_weights(load_catalog().get(TINY), models)
    results = []
    for mb in [int(s) for s in args.sizes.split(",")]:
        data = work / f"chat-{mb}mb.jsonl"
        if not data.exists():
            t = time.monotonic()
            n = generate(data, mb)
            print(
                json.dumps({"generated": str(data), "examples": n, "seconds": round(time.monotonic() - t, 1)})
            )
        modes = (["old"] if mb <= args.old_max_mb else []) + ["new", "resume"]
        run = work / f"run-{mb}mb"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        for mode in modes:
            spec = {
                "job_id": f"ftjob-bench-{mb}",
                "base_model": TINY,
                "models_dir": str(models),
                "training_file": str(data),
                "output_dir": str(run / mode / "adapter"),
                "hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1},
                "device": "cpu",
                "checkpoint_dir": str(run / ("old" if mode == "old" else "new") / "checkpoints"),
                "pause_file": str(run / ("old" if mode == "old" else "new") / "pause"),
                "data_dir": str(run / "data"),
            }
            spec_path = run / f"spec-{mode}.json"
            spec_path.parent.mkdir(parents=True, exist_ok=True)
            spec_path.write_text(json.dumps(spec))
            Path(spec["pause_file"]).parent.mkdir(parents=True, exist_ok=True)
            Path(spec["pause_file"]).unlink(missing_ok=True)
            result = {"size_mb": mb, **run_trainer(mode, spec_path)}
            print(json.dumps(result), flush=True)
            results.append(result)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
