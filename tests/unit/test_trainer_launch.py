"""How the worker starts the trainer: the launch command per plan and the accelerate configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from loraforge.contracts.train_spec import TrainPlan
from loraforge.contracts.trainer_launch import FSDP_CONFIG, SINGLE_GPU_CONFIG, launch_command

ROOT = Path(__file__).resolve().parents[2]


def test_single_process_plans_run_the_trainer_module_directly() -> None:
    for plan in (TrainPlan(), TrainPlan(strategy="qlora"), TrainPlan(strategy="fsdp", num_gpus=1)):
        assert launch_command("/runs/spec.json", plan, python="/py") == [
            "/py",
            "-m",
            "loraforge.trainer",
            "/runs/spec.json",
        ]
    assert launch_command(Path("s.json"), TrainPlan())[0] == sys.executable


def test_fsdp_plan_goes_through_accelerate_launch_with_one_process_per_gpu() -> None:
    cmd = launch_command("/runs/spec.json", TrainPlan(strategy="fsdp", num_gpus=4), python="/py")
    assert cmd == [
        "/py",
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "4",
        "-m",
        "loraforge.trainer",
        "/runs/spec.json",
    ]
    assert FSDP_CONFIG.is_file() and SINGLE_GPU_CONFIG.is_file()


def test_accelerate_accepts_the_fsdp_config_and_command() -> None:
    """accelerate's own parser and FSDP plugin read the config as FSDP2, full shard, Llama layers."""
    pytest.importorskip("accelerate")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    raw = yaml.safe_load(FSDP_CONFIG.read_text())
    assert raw["distributed_type"] == "FSDP" and raw["mixed_precision"] == "bf16"
    fsdp = raw["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"

    cmd = launch_command("/runs/spec.json", TrainPlan(strategy="fsdp", num_gpus=8), python="/py")
    args = launch_command_parser().parse_args(cmd[3:])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp and args.num_processes == 8 and args.module
    assert args.training_script == "loraforge.trainer" and args.training_script_args == ["/runs/spec.json"]
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_single_gpu_config_is_one_process_without_mixed_precision() -> None:
    raw = yaml.safe_load(SINGLE_GPU_CONFIG.read_text())
    assert raw["distributed_type"] == "NO" and raw["num_processes"] == 1
    # The trainer autocasts itself (fp32 LoRA, bf16 base); accelerate must not add its own.
    assert raw["mixed_precision"] == "no"


@pytest.mark.slow  # two trainer processes under accelerate launch
def test_two_processes_train_like_one(tmp_path: Path) -> None:
    """The accelerate-aware loop under a launcher (torchrun, gloo, CPU DDP): each rank trains on its
    share of every step, the loss is normalised by the global labelled-token count, only rank 0
    prints lines and writes files -- and the run computes what one process computes."""
    import json
    import os
    import signal
    import subprocess

    from safetensors.torch import load_file

    from loraforge.catalog import load_catalog
    from loraforge.catalog.loading import resolve_weights
    from loraforge.contracts.train_spec import TrainSpec

    models = tmp_path / "models"
    resolve_weights(load_catalog().get("loraforge/tiny-llama"), models)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Ticket {i}: " + "late order " * (i % 4 + 1)},
                {"role": "assistant", "content": " ".join(["refund"] * (i % 3 + 1)) + f" {i}"},
            ]
        }
        for i in range(11)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))

    def run(name: str, launcher: list[str]) -> tuple[list[dict], Path]:
        spec = TrainSpec(
            job_id=f"ftjob-{name}",
            base_model="loraforge/tiny-llama",
            models_dir=str(models),
            training_file=str(tmp_path / "train.jsonl"),
            output_dir=str(tmp_path / name / "adapter"),
            checkpoint_dir=str(tmp_path / name / "ckpt"),
            hyperparameters={"n_epochs": 2, "batch_size": 3},  # 11 examples: a 2-example last step
            device="cpu",
            plan=TrainPlan(token_budget=48),
        )
        path = tmp_path / f"{name}.json"
        path.write_text(spec.model_dump_json())
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        # Own session: on a timeout the launcher *and* its ranks are killed, not orphaned.
        proc = subprocess.Popen(
            [*launcher, "-m", "loraforge.trainer", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        assert proc.returncode == 0, stderr[-3000:]
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        return lines, Path(spec.output_dir)

    one, one_dir = run("one", [sys.executable])
    # --standalone: a local rendezvous on a free port.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two, two_dir = run("two", torchrun)
    assert [e["type"] for e in two] == [e["type"] for e in one]  # one stream of lines, from rank 0
    losses_one = [e["train_loss"] for e in one if e["type"] == "metrics"]
    losses_two = [e["train_loss"] for e in two if e["type"] == "metrics"]
    assert len(losses_one) == 8
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    a = load_file(one_dir / "adapter_model.safetensors")
    b = load_file(two_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key
    assert len(list((tmp_path / "two" / "ckpt").glob("step-*"))) == 2
