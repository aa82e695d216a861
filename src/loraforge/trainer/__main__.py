"""``python -m loraforge.trainer SPEC.json``: run :func:`loraforge.trainer.train`, JSON lines on stdout.

stdout carries only the JSON lines (see the package docstring); logs, warnings and progress bars
go to stderr. SIGTERM stops the run promptly without writing the adapter (exit 143).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TextIO

from loraforge.trainer.data import TrainingDataError, read_chat_jsonl
from loraforge.trainer.spec import load_spec

logger = logging.getLogger("loraforge.trainer")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_DATA_ERROR = 2
EXIT_SIGTERM = 128 + signal.SIGTERM


class TrainingCancelled(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """Raised from the SIGTERM handler; a BaseException so no ``except Exception`` swallows it."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise TrainingCancelled(f"received signal {signum}")


def _claim_stdout() -> TextIO:
    """Keep the real stdout for JSON lines and point fd 1 (and ``sys.stdout``) at stderr.

    Anything a library prints, even from C, then lands on stderr instead of corrupting the stream.
    """
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(json_fd, "w", buffering=1, encoding="utf-8")


def _emitter(out: TextIO) -> Callable[[dict[str, Any]], None]:
    def emit(event: dict[str, Any]) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    return emit


def main(argv: list[str] | None = None) -> int:
    """Run one training spec.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``): the spec path.

    Returns:
        The exit code: 0 done, 1 error, 2 invalid data, 143 SIGTERM.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m loraforge.trainer", description=__doc__)
    parser.add_argument("spec", help="path of the TrainSpec JSON file")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    out = _claim_stdout()
    emit = _emitter(out)
    try:
        spec = load_spec(args.spec)
        # Fail fast on a bad file, before the seconds-long torch/transformers import.
        read_chat_jsonl(spec.training_file)
        from loraforge.trainer.recipe import train  # torch & co. load only after the env is set

        train(spec, emit)
        return EXIT_OK
    except TrainingCancelled as exc:
        logger.warning("training cancelled (%s); no adapter written", exc)
        return EXIT_SIGTERM
    except TrainingDataError as exc:
        logger.error("invalid training data: %s", exc.message)
        emit(exc.to_dict())
        return EXIT_DATA_ERROR
    except Exception as exc:
        logger.exception("training failed")
        emit({"type": "error", "code": "training_error", "message": str(exc), "param": None})
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
