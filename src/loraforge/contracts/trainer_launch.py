"""How the worker starts a trainer: its command line and the environment it reads.

Pure (no torch): the worker builds the command with :func:`launch_command` (one process, or
``accelerate launch`` for FSDP), sets :data:`PARENT_PID_ENV`, and checks ``LORAFORGE_KERNELS``
with :func:`requested_kernels` before it starts a trainer that would otherwise fail on it only
after loading the model. The trainer (``loraforge.trainer.__main__``, ``device_setup``, ``loss``)
reads the same names from here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loraforge.contracts.train_spec import TrainPlan

# configs/accelerate/ of the source tree this package was installed from (like configs/models.yaml).
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "accelerate"
FSDP_CONFIG = ACCELERATE_CONFIGS / "fsdp.yaml"
SINGLE_GPU_CONFIG = ACCELERATE_CONFIGS / "single_gpu.yaml"

# The worker's pid: the trainer (and every FSDP rank) dies with that process.
PARENT_PID_ENV = "LORAFORGE_TRAINER_PARENT_PID"
# Which kernels the trainer uses (see requested_kernels).
KERNELS_ENV = "LORAFORGE_KERNELS"
KERNEL_CHOICES = ("auto", "liger", "torch")


def launch_command(
    spec_path: str | Path, plan: TrainPlan, python: str | None = None, main_process_port: int | None = None
) -> list[str]:
    """The argv that runs ``python -m loraforge.trainer SPEC`` the way ``plan`` needs.

    ``fsdp`` on more than one GPU goes through ``accelerate launch`` with
    ``configs/accelerate/fsdp.yaml`` and one process per GPU (only rank 0 prints JSON lines);
    everything else is the plain single-process command (no launcher: nothing to set up, and the
    worker's signals reach the trainer directly).

    Args:
        spec_path: the spec JSON file.
        plan: the run's memory plan.
        python: the interpreter (default: this one).
        main_process_port: the FSDP ranks' rendezvous port (default: accelerate's 29500). Two
            FSDP jobs on one host need different ones.

    Returns:
        The command, ready for ``subprocess.Popen``.
    """
    python = python or sys.executable
    trainer = ["-m", "loraforge.trainer", str(spec_path)]
    if plan.strategy == "fsdp" and plan.num_gpus > 1:
        return [
            python,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(FSDP_CONFIG),
            "--num_processes",
            str(plan.num_gpus),
            *(["--main_process_port", str(main_process_port)] if main_process_port else []),
            *trainer,
        ]
    return [python, *trainer]


def requested_kernels(value: str | None = None) -> str:
    """The kernel choice: ``value``, else ``$LORAFORGE_KERNELS``, else ``auto``.

    ``torch`` means no Liger anywhere (norms, MLP, RoPE and the loss); ``liger`` means Liger or
    an error; ``auto`` means Liger where it works.

    Args:
        value: an explicit choice (the benchmark's ``--kernels``); None reads the environment.

    Returns:
        ``auto``, ``liger`` or ``torch``.

    Raises:
        ValueError: anything else (a typo must not silently run or benchmark the other path).
    """
    raw = (value if value is not None else os.environ.get(KERNELS_ENV, "")).strip().lower() or "auto"
    if raw not in KERNEL_CHOICES:
        raise ValueError(f"{KERNELS_ENV}={raw!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    return raw
