"""``python -m loraforge.preflight.scan_process RESULT``: check one byte range of a file for
``preflight/parallel.py``. Reads the pickled task on stdin, prints ``read N`` progress lines, and
pickles ``(FileReport, ScanState)`` to RESULT."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path


def main() -> None:
    from loraforge.preflight.parallel import scan_range

    task = pickle.loads(sys.stdin.buffer.read())

    def progress(n_bytes: int) -> None:
        sys.stdout.write(f"read {n_bytes}\n")
        sys.stdout.flush()

    result = scan_range(task, progress)
    Path(sys.argv[1]).write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    main()
