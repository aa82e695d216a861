"""``LORAFORGE_KERNELS``: Liger's RMSNorm/SwiGLU/RoPE on CUDA only, never a silent change on CPU.

The choice logic runs on a tiny random Llama built from a config (no catalog, no tokenizer). The
last test needs ``liger_kernel`` (not a dependency; carried to the GPU machines): it checks on CPU
that Liger's patch, applied before PEFT as the trainer applies it, leaves PEFT's LoRA layers in
the MLP's call path. Liger's SiLU-mul is a Triton kernel, so that test swaps in the same math in
torch for the one call; what it checks is which modules the patched ``forward`` calls.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraforge.contracts.trainer_launch import KERNELS_ENV, requested_kernels
from loraforge.trainer import device_setup, kernels, loss
from loraforge.trainer.device_setup import apply_kernels
from loraforge.trainer.loss import resolve_loss_mode

torch = pytest.importorskip("torch")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")

# What Liger patches module-globally (restored after each test that could patch them).
LLAMA_GLOBALS = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")


def tiny_llama():
    """A 2-layer random Llama (hidden 32) on CPU, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def patched_instances(model) -> list[str]:
    """Names of the submodules whose ``forward`` was rebound on the instance (Liger's way)."""
    return [name for name, module in model.named_modules() if "forward" in vars(module)]


@pytest.fixture
def llama_globals(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The module-global Llama functions/classes now; monkeypatch puts them back afterwards."""
    originals = {name: getattr(modeling_llama, name) for name in LLAMA_GLOBALS}
    for name, value in originals.items():
        monkeypatch.setattr(modeling_llama, name, value)
    return originals


@pytest.fixture(autouse=True)
def fresh_liger_check() -> Iterator[None]:
    """The "is Liger usable" answer is cached per process: each test asks afresh."""
    kernels.liger_unusable_reason.cache_clear()
    yield
    kernels.liger_unusable_reason.cache_clear()


@pytest.fixture
def broken_liger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``liger_kernel`` installed (find_spec finds it) but failing on import, as with a Triton
    that does not match the CUDA driver."""
    package = tmp_path / "liger_kernel"
    (package / "transformers").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "transformers" / "__init__.py").write_text(
        "raise RuntimeError('triton: no usable CUDA driver')\n"
    )
    saved = {name: mod for name, mod in sys.modules.items() if name.startswith("liger_kernel")}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    # The fake parent package stays imported after the failed import: take it out again.
    for name in [n for n in sys.modules if n.startswith("liger_kernel")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_installed_but_broken_liger_is_not_used_by_the_loss_or_the_kernels(
    broken_liger: None, monkeypatch: pytest.MonkeyPatch, llama_globals
) -> None:
    """Before: the loss checked find_spec ("installed") and picked the fused kernel, and every
    single-GPU CUDA job crashed at setup. Now both ask the same real import."""
    import importlib.util

    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert importlib.util.find_spec("liger_kernel") is not None
    assert resolve_loss_mode("auto", "cuda") == "chunked"
    assert "triton: no usable CUDA driver" in (kernels.liger_unusable_reason() or "")
    model = tiny_llama()
    assert apply_kernels(model, "cuda", "auto") == "torch"
    with pytest.raises(RuntimeError, match="no usable CUDA driver"):
        apply_kernels(model, "cuda", "liger")
    assert patched_instances(model) == []


def test_kernels_torch_means_no_liger_loss_either(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss, "liger_usable", lambda: True)  # as on a GPU machine with the wheel
    monkeypatch.setenv(KERNELS_ENV, "auto")
    assert resolve_loss_mode("auto", "cuda") == "fused"
    assert resolve_loss_mode("auto", "cuda", world_size=2) == "chunked"
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert resolve_loss_mode("auto", "cuda") == "chunked"
    assert resolve_loss_mode("chunked", "cuda", kernels="torch") == "chunked"
    monkeypatch.setenv(KERNELS_ENV, "ligre")
    with pytest.raises(ValueError, match="LORAFORGE_KERNELS='ligre'"):
        resolve_loss_mode("auto", "cuda")


def test_the_choice_comes_from_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert requested_kernels() == "auto"
    monkeypatch.setenv(KERNELS_ENV, " Liger ")
    assert requested_kernels() == "liger"
    assert requested_kernels("torch") == "torch"
    monkeypatch.setenv(KERNELS_ENV, "triton")
    with pytest.raises(ValueError, match="LORAFORGE_KERNELS='triton'"):
        requested_kernels()


def test_auto_on_cpu_patches_nothing(monkeypatch: pytest.MonkeyPatch, llama_globals) -> None:
    monkeypatch.setenv(KERNELS_ENV, "auto")
    model = tiny_llama()
    assert apply_kernels(model, "cpu") == "torch"
    assert patched_instances(model) == []
    assert {name: getattr(modeling_llama, name) for name in LLAMA_GLOBALS} == llama_globals


def test_liger_requested_on_cpu_is_an_error_not_a_fallback(llama_globals) -> None:
    # An explicit request that cannot be honoured fails: a benchmark asked for Liger must not
    # quietly measure eager torch.
    model = tiny_llama()
    with pytest.raises(RuntimeError, match="LORAFORGE_KERNELS=liger cannot be honoured: device cpu"):
        apply_kernels(model, "cpu", "liger")
    assert patched_instances(model) == []
    assert {name: getattr(modeling_llama, name) for name in LLAMA_GLOBALS} == llama_globals


def test_cuda_without_liger_falls_back_on_auto_and_fails_on_liger(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, llama_globals
) -> None:
    # None in sys.modules makes the import raise ImportError, as on a machine without the wheel.
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger=device_setup.__name__):
        assert apply_kernels(model, "cuda", "auto") == "torch"
    assert "eager torch" in caplog.text and "fetch_gpu_wheels.sh" in caplog.text
    with pytest.raises(RuntimeError, match="liger_kernel does not import"):
        apply_kernels(model, "cuda", "liger")
    assert patched_instances(model) == []


def test_other_architectures_keep_torch_kernels_on_auto() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config)
    assert apply_kernels(model, "cuda", "auto") == "torch"
    with pytest.raises(RuntimeError, match="model type 'qwen2'"):
        apply_kernels(model, "cuda", "liger")
    assert patched_instances(model) == []


def test_liger_patch_before_peft_keeps_the_lora_layers_in_the_mlp_call_path(
    monkeypatch: pytest.MonkeyPatch, llama_globals
) -> None:
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger_kernel is not installed here")
    from liger_kernel.transformers import swiglu as liger_swiglu
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = tiny_llama()
    # device_type "cuda" only selects the path; nothing below runs a Triton kernel.
    assert apply_kernels(model, "cuda", "liger") == "liger"
    layer = model.model.layers[0]
    assert layer.mlp.forward.__func__ is liger.LigerSwiGLUMLP.forward
    assert layer.input_layernorm.forward.__func__ is liger.LigerRMSNorm.forward
    assert modeling_llama.apply_rotary_pos_emb is not llama_globals["apply_rotary_pos_emb"]  # global

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, lora)
    mlp = peft_model.get_base_model().model.layers[0].mlp
    assert mlp.forward.__func__ is liger.LigerSwiGLUMLP.forward  # still Liger's after wrapping
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(mlp, name), LoraLayer)
        torch.nn.init.normal_(getattr(mlp, name).lora_B["default"].weight)  # B = 0 would hide LoRA

    def torch_silu_mul(a, b, gate_multiplier=1.0, down_multiplier=1.0):
        """silu(a) * b in torch: the math of Liger's Triton SiLU-mul for Llama, runnable on CPU."""
        assert gate_multiplier == 1.0 and down_multiplier == 1.0  # Llama's MLP has no multipliers
        return torch.nn.functional.silu(a) * b

    # LigerSwiGLUMLP.forward looks this name up in its module at call time (liger-kernel 0.8.x).
    monkeypatch.setattr(liger_swiglu, "_swiglu_dispatch", torch_silu_mul)
    called: list[str] = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, name).register_forward_hook(lambda _m, _i, _o, name=name: called.append(name))

    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        out = mlp(x)
        # What the LoRA-wrapped projections give, composed by hand: equal, and not the base alone.
        expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        base = mlp.down_proj.base_layer(
            torch.nn.functional.silu(mlp.gate_proj.base_layer(x)) * mlp.up_proj.base_layer(x)
        )
    assert called[:3] == ["gate_proj", "up_proj", "down_proj"]
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, base, atol=1e-3)
