"""Grouped LoRA slots give PEFT's numbers for mixed batches, and stay right through load/unload."""

from __future__ import annotations

import zlib

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loraforge.catalog import load_catalog
from loraforge.catalog.loading import load_model
from loraforge.serving import grouped_lora
from loraforge.serving.grouped_lora import BASE_ROW, GroupedLora

BASE = "loraforge/tiny-llama"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (rank, alpha, target modules, rsLoRA): ranks and targets differ, so slots are padded
# to different widths per layer and some layers hold only some adapters.
ADAPTERS = {
    "r4": (4, 8, ["q_proj", "v_proj"], False),
    "r8": (8, 16, ALL, True),
    "r16": (16, 8, ALL, False),
}


# Summing the same products in another order (padded ranks, the scaling folded into B, bmm vs.
# per-adapter matmuls) moves these logits (up to ~35) by ~2e-5 at most (40 seeds tried).
CLOSE = {"rtol": 1e-5, "atol": 1e-4}


def _config(rank: int, alpha: int, targets: list[str], rslora: bool) -> LoraConfig:
    # init_lora_weights=False: B random too (PEFT's default B = 0 would make every adapter a no-op).
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False
    )


def _add(model, name: str, rank: int, alpha: int, targets: list[str], rslora: bool = False) -> None:
    torch.manual_seed(zlib.crc32(name.encode()))
    model.add_adapter(name, _config(rank, alpha, targets, rslora))
    _tame(model, name)
    model.eval()


def _tame(model, name: str) -> None:
    """Shrink B to a trained adapter's scale: PEFT's random B moves logits by ~45 (fp32 noise ~1e-4)."""
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f"lora_B.{name}." in key:
                param.mul_(0.1)


@pytest.fixture
def peft_model(tmp_path):
    entry = load_catalog().get(BASE)
    base = load_model(entry, tmp_path / "models")
    first, *rest = ADAPTERS
    torch.manual_seed(0)
    model = get_peft_model(base, _config(*ADAPTERS[first]), adapter_name=first)
    _tame(model, first)
    for name in rest:
        _add(model, name, *ADAPTERS[name])
    return model.eval()


@pytest.fixture
def grouped(peft_model) -> GroupedLora:
    grouped = GroupedLora(peft_model, max_slots=4)
    assert all(grouped.add(name) for name in ADAPTERS)
    return grouped


def _batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (as the engine builds them)."""
    torch.manual_seed(1)
    ids = torch.randint(10, 1000, (rows, 12))
    mask = torch.ones_like(ids)
    for i in range(rows):
        mask[i, : i % 4] = 0
    return ids, mask


def _peft_logits(model, names: list[str], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, adapter_names=names).logits


def _grouped_logits(model, grouped: GroupedLora, names, ids, mask) -> torch.Tensor:
    with torch.inference_mode(), grouped.route(names):
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize(
    "names",
    [
        ["r4", BASE_ROW, "r16", "r8", "r16", BASE_ROW],  # mixed, base rows included
        ["r8", "r8", "r8"],  # one adapter: the no-gather path
        [BASE_ROW, BASE_ROW],  # all base: LoRA skipped
    ],
)
def test_logits_equal_peft_mixed_batch(peft_model, grouped, names):
    ids, mask = _batch(len(names))
    expected = _peft_logits(peft_model, names, ids, mask)
    got = _grouped_logits(peft_model, grouped, names, ids, mask)
    torch.testing.assert_close(got, expected, **CLOSE)
    with torch.inference_mode(), peft_model.disable_adapter():
        bare = peft_model(input_ids=ids, attention_mask=mask).logits
    for i, name in enumerate(names):
        if name == BASE_ROW:
            assert torch.equal(got[i], bare[i])  # slot 0 adds exactly nothing
        else:
            assert (got[i] - bare[i]).abs().max() > 1e-2  # the adapter really acts on its row


@pytest.mark.parametrize("cache_gathers", [True, False])
def test_generate_with_kv_cache_equals_peft(peft_model, grouped, cache_gathers, monkeypatch):
    """Prefill and cached decode steps: the same greedy tokens and logits as PEFT's path.

    Without the gather cache (what a large model gets) each forward gathers the factors anew.
    """
    if not cache_gathers:
        monkeypatch.setattr(grouped_lora, "GATHER_CACHE_BYTES", 0)
    names = ["r16", BASE_ROW, "r4", "r8"]
    ids, mask = _batch(len(names))
    kwargs = {
        "max_new_tokens": 12,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    with torch.inference_mode():
        expected = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
        with grouped.route(names):
            got = peft_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), **CLOSE)


def test_outside_route_the_layers_run_peft(peft_model, grouped):
    ids, mask = _batch(2)
    peft_model.set_adapter("r16")
    with torch.inference_mode():
        active = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(active, _peft_logits(peft_model, ["r16", "r16"], ids, mask))


def _layer(grouped: GroupedLora, module: str):
    """The slot stacks of the first layer's ``module`` projection."""
    return next(slots for m, slots in grouped._layers.items() if m.base_layer is module)


def test_unload_frees_and_reuses_slots_and_shrinks_the_stacks(peft_model, grouped):
    layers = peft_model.base_model.model.model.layers
    q_proj, up_proj = layers[0].self_attn.q_proj.base_layer, layers[0].mlp.up_proj.base_layer
    assert [grouped.slot_of(n) for n in ADAPTERS] == [1, 2, 3]
    assert _layer(grouped, q_proj).a.shape == (4, 64, 16)  # slot 0 + 3 adapters, padded to r16

    for name in ("r16", "r8"):  # what PEFT's delete_adapter + the engine do on unload
        peft_model.delete_adapter(name)
        grouped.remove(name)
    assert grouped.num_slots == 2 and grouped.slot_of("r16") is None
    q_slots = _layer(grouped, q_proj)
    assert q_slots.a.shape == (2, 64, 4) and q_slots.b.shape == (2, 4, 64)  # memory given back
    assert _layer(grouped, up_proj).a.shape == (2, 64, 0)  # no adapter left there

    # "new" takes r8's old slot but not the MLP: nothing of r8 may be left there to leak into it.
    _add(peft_model, "new", 2, 4, ["q_proj", "k_proj", "o_proj"])
    assert grouped.add("new") and grouped.slot_of("new") == 2  # the freed slot is reused
    names = ["new", BASE_ROW, "r4", "new"]
    ids, mask = _batch(len(names))
    torch.testing.assert_close(
        _grouped_logits(peft_model, grouped, names, ids, mask),
        _peft_logits(peft_model, names, ids, mask),
        **CLOSE,
    )


def test_slots_are_bounded_and_unservable_adapters_fall_back(peft_model, grouped):
    _add(peft_model, "fourth", 4, 8, ALL)
    assert grouped.add("fourth") and grouped.num_slots == 5
    _add(peft_model, "fifth", 4, 8, ALL)
    with pytest.raises(RuntimeError, match="slots"):
        grouped.add("fifth")
    peft_model.delete_adapter("fifth")

    grouped.remove("fourth")
    peft_model.delete_adapter("fourth")

    beyond = {  # what the stacks cannot represent: PEFT's own path must serve these
        "dora": LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
        "embed": LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]),
        "saved": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }
    for name, config in beyond.items():
        peft_model.add_adapter(name, config)
        assert grouped.add(name) is False
        assert not grouped.supports(["r4", BASE_ROW])  # its extra modules would leak into rows
        with pytest.raises(ValueError):
            with grouped.route(["r4"]):
                pass
        grouped.remove(name)
        peft_model.delete_adapter(name)
        assert grouped.supports(["r4", BASE_ROW])
