"""A DPO step on the CUDA fast path (packed pairs under a token budget, flex_attention, the chunked
per-sequence log-probs) computes what the CPU reference computes. Skipped without CUDA.

Both runs are set up by the trainer itself (``recipe.setup``: the reference log-probs are taken
before any step, the adapter disabled), then the LoRA B matrices get the same seeded perturbation
(a policy that differs from its reference, so the loss is not the trivial ln 2) and one training
step runs. Tolerances: fp32 on both devices (the tiny model's catalog dtype), only the kernels'
summation order differs -- the step's DPO loss within rtol 1e-4, the rewards within 1e-3 absolute,
the LoRA gradients' cosine above 0.999.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import preference_examples

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)"),
]

TINY = "loraforge/tiny-llama"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraforge.catalog import load_catalog
    from loraforge.catalog.loading import resolve_weights

    path = tmp_path_factory.mktemp("models")
    resolve_weights(load_catalog().get(TINY), path)
    return path


def _one_step(folder: Path, models_dir: Path, device: str, plan: dict[str, Any]) -> tuple[Any, Any]:
    from loraforge.contracts.train_spec import TrainSpec
    from loraforge.trainer import dpo
    from loraforge.trainer.recipe import cleanup, setup

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_examples(10)))
    spec = TrainSpec(
        job_id=f"ftjob-dpo-{device}",
        base_model=TINY,
        models_dir=str(models_dir),
        training_file=str(data),
        output_dir=str(folder / "adapter"),
        hyperparameters={"n_epochs": 1, "batch_size": 10},
        method="dpo",
        dpo_beta=0.5,
        device=device,
        plan=plan,
    )
    run = setup(spec)
    generator = torch.Generator().manual_seed(0)
    named = sorted(run.model.peft.named_parameters())
    with torch.no_grad():
        for name, param in named:
            if "lora_B" in name:
                noise = 0.05 * torch.randn(param.shape, generator=generator)
                param.add_(noise.to(param.device, param.dtype))
    stats = dpo.run_step(run, run.data.train_set, train=True)
    grads = torch.cat([p.grad.detach().float().flatten().cpu() for _, p in named if p.grad is not None])
    cleanup(run)
    return stats, grads


def test_a_dpo_step_on_the_fast_path_matches_the_cpu_reference(tmp_path: Path, models_dir: Path) -> None:
    cpu, cpu_grads = _one_step(tmp_path / "cpu", models_dir, "cpu", {})
    # 10 pairs of ~60 tokens each: a 256-token budget packs two pairs per micro-batch.
    cuda, cuda_grads = _one_step(
        tmp_path / "cuda", models_dir, "cuda", {"token_budget": 256, "loss": "chunked"}
    )
    assert cpu.n_targets == cuda.n_targets == 10
    assert cpu.loss > 0.7  # the perturbed policy is not its reference
    assert cuda.loss == pytest.approx(cpu.loss, rel=1e-4)
    for key, value in cpu.extra.items():
        assert cuda.extra[key] == pytest.approx(value, abs=1e-3), key
    cosine = torch.nn.functional.cosine_similarity(cpu_grads, cuda_grads, dim=0)
    assert cosine > 0.999
