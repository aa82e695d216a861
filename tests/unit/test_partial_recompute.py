"""Selective activation checkpointing: the plan's field, the trainer's per-layer flags (same math,
the first k layers really recompute), the memory formula's ends, and the planner's choice of k."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from loraforge.catalog import BaseModelEntry, load_catalog
from loraforge.catalog.catalog import ModelArch
from loraforge.contracts.train_spec import TrainPlan
from loraforge.planner import JobPlan, plan_job
from loraforge.planner.memory import GIB, RunShape, estimate
from loraforge.settings import TrainPool

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_8B = load_catalog().get("meta-llama/Llama-3.1-8B-Instruct")
assert _8B is not None and _8B.arch is not None
LLAMA8B: BaseModelEntry = _8B
ARCH8B: ModelArch = _8B.arch
L8B = ARCH8B.num_hidden_layers
LAYERS = 4  # the tiny test model's decoder layers


def plan_8b(memory_gib: float) -> JobPlan:
    pool = TrainPool(name="gpu", device="cuda", count=1, memory_gib=memory_gib)
    result = plan_job(
        LLAMA8B, [pool], lora_r=16, target_modules=ALL_LINEAR, max_seq_length=LLAMA8B.max_seq_length
    )
    assert isinstance(result, JobPlan), result
    return result


# ---------------------------------------------------------------- the plan's fields


def test_checkpoint_layers_and_gradient_checkpointing_agree() -> None:
    assert TrainPlan(checkpoint_layers=3).gradient_checkpointing is True
    assert TrainPlan(checkpoint_layers=0).gradient_checkpointing is False
    assert TrainPlan(gradient_checkpointing=True).checkpointed_layers(32) == 32  # None: all
    assert TrainPlan().checkpointed_layers(32) == 0
    assert TrainPlan(checkpoint_layers=16).checkpointed_layers(32) == 16
    assert TrainPlan(checkpoint_layers=40).checkpointed_layers(32) == 32
    # A stored plan round-trips (the worker copies job.plan into the spec).
    stored = TrainPlan(checkpoint_layers=5).model_dump(mode="json")
    assert TrainPlan.model_validate(stored) == TrainPlan(checkpoint_layers=5)
    with pytest.raises(ValidationError, match="contradicts"):
        TrainPlan(gradient_checkpointing=False, checkpoint_layers=2)
    with pytest.raises(ValidationError, match="contradicts"):
        TrainPlan(gradient_checkpointing=True, checkpoint_layers=0)


# ---------------------------------------------------------------- memory formula and planner


@pytest.mark.parametrize("tokens", [512, 4096, 8192, 16384])
@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_k0_and_kL_are_the_no_ac_and_ac_estimates(tokens: int, strategy: str) -> None:
    """The partial formula's ends are exactly the two former cases (written out here)."""
    s = RunShape(ARCH8B, 16, tuple(ALL_LINEAR))
    a, h = 2, ARCH8B.hidden_size
    per_layer = s.layer_activation_bytes(a)
    none = estimate(s, strategy=strategy, device="cuda", tokens=tokens, checkpointing=False)  # type: ignore[arg-type]
    full = estimate(s, strategy=strategy, device="cuda", tokens=tokens, checkpointing=True)  # type: ignore[arg-type]
    assert none == estimate(s, strategy=strategy, device="cuda", tokens=tokens, checkpoint_layers=0)  # type: ignore[arg-type]
    assert full == estimate(s, strategy=strategy, device="cuda", tokens=tokens, checkpoint_layers=L8B)  # type: ignore[arg-type]
    assert none.activations == tokens * (L8B * per_layer + 3 * a * h)
    assert full.activations == tokens * (L8B * a * h + 3 * a * h)
    loss = min(tokens, 4096) * ARCH8B.vocab_size * 12
    assert none.transient == max(loss, tokens * per_layer)
    assert full.transient == max(loss, 2 * tokens * per_layer)
    half = estimate(s, strategy=strategy, device="cuda", tokens=tokens, checkpoint_layers=16)  # type: ignore[arg-type]
    assert half.activations == tokens * (16 * per_layer + 16 * a * h + 3 * a * h)
    assert half.transient == none.transient  # the first k recompute: no 2A on the full saved set
    assert (none.checkpoint_layers, half.checkpoint_layers, full.checkpoint_layers) == (0, 16, L8B)
    assert not none.checkpointing and half.checkpointing and full.checkpointing


def test_8b_on_a_48gb_card_recomputes_only_some_layers_and_says_so() -> None:
    result = plan_8b(48)
    p = result.train_plan
    k = p.checkpoint_layers
    assert p.strategy == "lora" and p.gradient_checkpointing and k is not None and 0 < k < L8B
    # The target is max_seq_length (8,192 here, above RECOMPUTE_MIN_TOKENS): the budget reaches it.
    target = LLAMA8B.max_seq_length
    assert p.token_budget is not None and p.token_budget >= target
    assert result.estimate is not None and result.estimate.fits(48)
    # The fewest layers: one fewer does not fit the target micro-batch.
    s = RunShape(ARCH8B, 16, tuple(ALL_LINEAR))
    fewer = estimate(s, strategy="lora", device="cuda", tokens=target, checkpoint_layers=k - 1)
    assert not fewer.fits(48)
    assert f"activation checkpointing on {k} of {L8B} layers" in result.summary()
    assert result.to_record()["checkpoint_layers"] == k
    # Where no recompute fits (80 GiB) the summary is unchanged.
    assert "no activation checkpointing" in plan_8b(80).summary()


def test_checkpointed_layers_grow_monotonically_as_memory_shrinks() -> None:
    seen: list[tuple[float, int]] = []
    for memory in [140.4, 80, 64, 56, 48, 44, 40, 36, 32, 30, 28]:
        p = plan_8b(memory).train_plan
        if p.strategy != "lora":
            break
        assert p.checkpoint_layers is not None
        seen.append((memory, p.checkpoint_layers))
    ks = [k for _, k in seen]
    assert ks == sorted(ks), seen
    assert ks[0] == 0 and any(0 < k < L8B for k in ks), seen  # none, then partial


_70B = load_catalog().get("meta-llama/Llama-3.3-70B-Instruct")
assert _70B is not None


# The 70B sweeps take about a second each.
@pytest.mark.parametrize("entry", [LLAMA8B, pytest.param(_70B, marks=pytest.mark.slow)], ids=["8B", "70B"])
@pytest.mark.parametrize("max_seq_length", [512, 1024, 2048, 4096, 8192])
def test_recompute_policy_is_minimal_and_monotone(entry: BaseModelEntry, max_seq_length: int) -> None:
    """planner/plan.py rules 1-3, swept over memory: (b) no recompute when max_seq_length fits
    without it; (a) never more layers than the fewest that fit max(max_seq_length, the floor),
    so layers are never bought for budget (before: 8B at 32 GiB / 2,048 recomputed 31 of 32
    layers for an 11k budget where 11 layers fit 2,048 tokens); (c) for a fixed strategy more
    memory never recomputes more layers (before: 8B / 512 went from 29 layers at 22 GiB to all
    32 at 24 GiB, its fallback chasing the largest budget)."""
    from loraforge.planner.plan import RECOMPUTE_MIN_TOKENS

    assert entry.arch is not None
    target = max(max_seq_length, RECOMPUTE_MIN_TOKENS)
    last: tuple[str, int] | None = None
    for tenths in range(100, 1500, 5):
        memory = tenths / 10
        pool = TrainPool(name="gpu", device="cuda", count=1, memory_gib=memory)
        result = plan_job(entry, [pool], lora_r=16, target_modules=ALL_LINEAR, max_seq_length=max_seq_length)
        if not isinstance(result, JobPlan):
            assert last is None, f"{memory} GiB no longer fits"
            continue
        p = result.train_plan
        k = p.checkpoint_layers
        assert k is not None and p.strategy != "fsdp"
        shape = RunShape(entry.arch, 16, tuple(ALL_LINEAR), entry.training.dtype)

        def fits(
            tokens: int, layers: int, p: TrainPlan = p, memory: float = memory, shape: RunShape = shape
        ) -> bool:
            return estimate(
                shape, strategy=p.strategy, device="cuda", tokens=tokens, checkpoint_layers=layers
            ).fits(memory)

        if fits(max_seq_length, 0):
            assert k == 0, (memory, k)  # (b)
        elif fits(target, k):
            assert not any(fits(target, j) for j in range(k)), (memory, k)  # (a): the fewest
        if last is not None and last[0] == p.strategy:
            assert k <= last[1], (memory, k, last)  # (c)
        last = (p.strategy, k)


def test_8b_at_32_gib_with_2k_sequences_recomputes_a_third_of_the_layers_not_all() -> None:
    pool = TrainPool(name="gpu", device="cuda", count=1, memory_gib=32)
    result = plan_job(LLAMA8B, [pool], lora_r=16, target_modules=ALL_LINEAR, max_seq_length=2048)
    assert isinstance(result, JobPlan)
    # The formula's numbers (the review's sweep): 11 layers fit 2,048 tokens; 31 bought 11,008.
    assert (result.train_plan.checkpoint_layers, result.train_plan.token_budget) == (11, 2048)


def test_a_non_integer_checkpoint_layers_is_a_validation_error() -> None:
    for bad in ("x", 2.5, [1], {"k": 1}):
        with pytest.raises(ValidationError):
            TrainPlan(checkpoint_layers=bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        TrainPlan.model_validate({"checkpoint_layers": "some"})


# ---------------------------------------------------------------- the trainer's per-layer flags

torch = pytest.importorskip("torch")


def tiny_lora_model(seed: int = 0) -> Any:
    """A 4-layer tiny Llama (fp32, sdpa) with a LoRA whose B is random (non-zero gradients)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_LINEAR, init_lora_weights=False
    )
    model = get_peft_model(base, lora)
    model.train()
    return model


def flags(model: Any) -> list[bool]:
    from loraforge.trainer.recompute import decoder_layers

    return [bool(layer.gradient_checkpointing) for layer in decoder_layers(model)]


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (TrainPlan(), [False] * LAYERS),
        (TrainPlan(gradient_checkpointing=True), [True] * LAYERS),
        (TrainPlan(checkpoint_layers=0), [False] * LAYERS),
        (TrainPlan(checkpoint_layers=1), [True, False, False, False]),
        (TrainPlan(checkpoint_layers=3), [True, True, True, False]),
        (TrainPlan(checkpoint_layers=9), [True] * LAYERS),
    ],
)
def test_the_flag_lands_on_exactly_the_first_k_layers(plan: TrainPlan, expected: list[bool]) -> None:
    from loraforge.trainer.device_setup import prepare_for_training

    model = prepare_for_training(tiny_lora_model(), plan, "cpu", None)
    assert flags(model) == expected


def test_a_model_wide_enable_is_trimmed_to_the_plans_layers() -> None:
    """QLoRA's prepare_model_for_kbit_training turns recompute on everywhere first."""
    from loraforge.trainer.device_setup import prepare_for_training

    model = tiny_lora_model()
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert flags(model) == [True] * LAYERS
    prepare_for_training(model, TrainPlan(checkpoint_layers=2), "cpu", None)
    assert flags(model) == [True, True, False, False]


def _step(plan: TrainPlan) -> tuple[Any, dict[str, Any], list[int]]:
    """Loss, LoRA grads and how often each layer's MLP ran, for one packed step under ``plan``."""
    from loraforge.trainer.data import TokenizedExample
    from loraforge.trainer.device_setup import prepare_for_training
    from loraforge.trainer.loss import CausalLMLoss
    from loraforge.trainer.packing import step_micro_batches
    from loraforge.trainer.recompute import decoder_layers
    from loraforge.trainer.step import forward_backward

    model = prepare_for_training(tiny_lora_model(), plan, "cpu", None)
    calls = [0] * LAYERS
    for i, layer in enumerate(decoder_layers(model)):
        # A pre-hook: the recompute stops early once the last saved tensor is back (torch's
        # checkpoint early stop), before the MLP's forward returns.
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    g = torch.Generator().manual_seed(1)
    docs = []
    for n in (37, 21, 50):
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        docs.append(TokenizedExample(input_ids=ids, labels=ids))
    micro = step_micro_batches(docs, packing=True, token_budget=None, pad_token_id=0)
    stats = forward_backward(
        CausalLMLoss(model, "full"), micro, device=torch.device("cpu"), backward=torch.Tensor.backward
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return stats, grads, calls


def test_partial_recompute_gives_the_same_loss_and_lora_grads_and_really_recomputes() -> None:
    plain, plain_grads, plain_calls = _step(TrainPlan())
    assert plain_calls == [1] * LAYERS  # forward only
    for k in (1, 2, LAYERS):
        stats, grads, calls = _step(TrainPlan(checkpoint_layers=k))
        # The first k layers ran their forward again in backward (the recompute); the rest did not.
        assert calls == [2] * k + [1] * (LAYERS - k)
        assert stats.loss == pytest.approx(plain.loss, rel=1e-5)
        assert grads.keys() == plain_grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            assert plain_grads[name].abs().sum() > 0, name
            torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7)


def test_memory_estimate_summary_in_gib_is_sane() -> None:
    """8B at 8k tokens with 16 of 32 layers recomputing: the docs' prediction (benchmarks.md)."""
    s = RunShape(ARCH8B, 16, tuple(ALL_LINEAR))
    half = estimate(s, strategy="lora", device="cuda", tokens=8192, checkpoint_layers=16)
    assert half.allocated / GIB == pytest.approx(45.2, abs=0.1)
