"""The command that starts a trainer for a spec: one process, or ``accelerate launch`` for FSDP.

Pure (no torch): the worker imports it to build the trainer's command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from loraforge.trainer.spec import TrainPlan

# configs/accelerate/ of the source tree this package was installed from (like configs/models.yaml).
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "accelerate"
FSDP_CONFIG = ACCELERATE_CONFIGS / "fsdp.yaml"
SINGLE_GPU_CONFIG = ACCELERATE_CONFIGS / "single_gpu.yaml"


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
