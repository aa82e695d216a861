"""How the model is loaded and set up for the device and plan: attention, dtype, QLoRA, recompute, compile.

* Attention: ``flex_attention`` on CUDA, ``sdpa`` on CPU. Both honour packed documents (the
  restarting position ids become a per-document mask), but sdpa can only take that mask as a dense
  ``[T, T]`` tensor, which on the GPU halved throughput next to flex's block-sparse mask
  (FACTS_GPU: 4.2k vs 8.6k tokens/s on 8B); flex_attention has no backward on CPU (torch 2.13),
  and there the dense mask costs nothing that matters.
* Dtype: on CUDA a bf16 base, LoRA parameters kept fp32 (PEFT's default: AdamW updates of ~1e-4
  relative size vanish in bf16) and the forward under bf16 autocast, with PEFT's cast of each
  LoRA input to fp32 switched off: that cast would keep an fp32/bf16 copy of every adapted
  layer's input for backward (~2.4 MB per token on 8B). On CPU everything stays fp32.
* QLoRA: the base loaded 4-bit NF4 through transformers' ``BitsAndBytesConfig`` (double quant,
  bf16 compute), then PEFT's ``prepare_model_for_kbit_training``; bitsandbytes imported lazily.
* Kernels (``LORAFORGE_KERNELS=auto|liger|torch``, read by the trainer process; not part of the
  plan: it changes speed and memory, not what is computed beyond rounding, and not the adapter's
  files -- Liger rebinds ``forward`` methods and adds no parameters): on CUDA, when
  ``liger_kernel`` really imports (``trainer/kernels.py``, the check the loss shares) and the model
  is a Llama, Liger's Triton RMSNorm, SwiGLU and RoPE replace the eager ones
  (:func:`apply_kernels`), before PEFT wraps the model. Liger patches the existing norm and
  MLP *instances* (their ``forward`` rebound), so the LoRA layers PEFT later sets as
  ``mlp.gate_proj`` etc. are what the patched forward calls; RoPE, and the ``LlamaRMSNorm`` /
  ``LlamaMLP`` names, are patched module-globally in ``transformers.models.llama.modeling_llama``
  (every Llama this process builds afterwards gets them: fine in the one-job trainer process).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from loraforge.catalog.catalog import BaseModelEntry
from loraforge.contracts.train_spec import TrainPlan
from loraforge.contracts.trainer_launch import KERNELS_ENV, requested_kernels
from loraforge.trainer.distributed import world_size
from loraforge.trainer.kernels import liger_unusable_reason
from loraforge.trainer.recompute import apply_activation_checkpointing, decoder_layers

logger = logging.getLogger(__name__)

Kernels = Literal["liger", "torch"]
# model_type -> Liger's patch function for it (what this trainer has checked: the catalog's Llamas).
_LIGER_PATCHES = {"llama": "apply_liger_kernel_to_llama"}


def attn_implementation(device_type: str) -> str:
    """The attention kernel for packed training on ``device_type`` (see the module docstring).

    Args:
        device_type: ``cpu`` or ``cuda``.

    Returns:
        ``flex_attention`` (CUDA with flex available) or ``sdpa``.
    """
    if device_type == "cuda":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401 - availability check
        except ImportError:
            return "sdpa"
        return "flex_attention"
    return "sdpa"


def compute_dtype(device_type: str, base_dtype: torch.dtype, strategy: str = "lora") -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA for a bf16 (or 4-bit) base, None otherwise (exact fp32).

    Args:
        device_type: ``cpu`` or ``cuda``.
        base_dtype: dtype the base weights were loaded in.
        strategy: ``TrainPlan.strategy`` (QLoRA computes in bf16 whatever its storage).

    Returns:
        ``torch.bfloat16`` or None.
    """
    if device_type != "cuda":
        return None
    if strategy == "qlora" or base_dtype == torch.bfloat16:
        return torch.bfloat16
    return None


def _liger_patch(model_type: str) -> Any:
    """Liger's patch function for ``model_type``; ImportError when Liger is not usable here."""
    reason = liger_unusable_reason()
    if reason is not None:
        raise ImportError(reason)
    import liger_kernel.transformers as liger

    return getattr(liger, _LIGER_PATCHES[model_type])


def apply_kernels(model: Any, device_type: str, requested: str | None = None) -> Kernels:
    """Swap in Liger's fused RMSNorm, SwiGLU and RoPE kernels when asked and possible.

    Call it on the plain transformers model, before PEFT wraps it (Liger finds the decoder layers
    through ``model.base_model_prefix``, which a ``PeftModel`` resolves to the wrong object).
    ``auto`` uses Liger on CUDA for a supported architecture when it imports, eager torch
    otherwise (logged); ``liger`` raises instead of falling back, so a benchmark or a deployment
    that asked for the kernels never measures or runs the other path unknowingly; ``torch``
    leaves the model's kernels as they are (and, in ``loss.resolve_loss_mode``, also turns the
    fused Liger loss off: ``torch`` means no Liger anywhere). Cross-entropy stays
    :mod:`loraforge.trainer.loss`'s (Liger's loss patches are off here: the trainer never calls
    the model's own loss). Whether Liger works is one shared, cached real import
    (``trainer/kernels.py``), the same check the loss uses.

    Args:
        model: the transformers causal LM, not yet PEFT-wrapped.
        device_type: ``cpu`` or ``cuda``.
        requested: ``auto``/``liger``/``torch``; None reads ``$LORAFORGE_KERNELS``.

    Returns:
        ``liger`` if the kernels were applied, else ``torch``.

    Raises:
        ValueError: an unknown choice.
        RuntimeError: ``liger`` requested where it cannot run (no CUDA, another architecture,
            liger_kernel not importable).
    """
    choice = requested_kernels(requested)
    if choice == "torch":
        return "torch"
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if device_type != "cuda":
        # Liger's kernels are Triton GPU kernels: nothing to apply on CPU.
        reason = f"device {device_type} (Liger's Triton kernels need CUDA)"
    elif model_type not in _LIGER_PATCHES:
        reason = f"model type {model_type!r} (Liger patches wired for: {', '.join(_LIGER_PATCHES)})"
    else:
        try:
            patch = _liger_patch(model_type)
        except ImportError as exc:
            reason = f"{exc} (carry its wheel: bench/fetch_gpu_wheels.sh)"
        else:
            patch(
                rope=True,
                rms_norm=True,
                swiglu=True,
                cross_entropy=False,
                fused_linear_cross_entropy=False,
                model=model,
            )
            logger.info("kernels: Liger RMSNorm, SwiGLU and RoPE applied to %s", model_type)
            return "liger"
    if choice == "liger":
        raise RuntimeError(f"{KERNELS_ENV}=liger cannot be honoured: {reason}")
    if device_type == "cuda":  # on CPU torch is simply the path; on CUDA it is worth a line
        logger.info("kernels: eager torch RMSNorm/SwiGLU/RoPE (%s)", reason)
    return "torch"


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401 - only checks that QLoRA can run
    except ImportError as exc:
        raise RuntimeError(
            "strategy 'qlora' needs the bitsandbytes package on the worker "
            "(pip install bitsandbytes; the GPU machines have no registry: carry its wheel)"
        ) from exc


def load_base(entry: BaseModelEntry, models_dir: Path, device: torch.device, plan: TrainPlan) -> Any:
    """Load the base model for ``plan`` on ``device`` with the device's attention kernel.

    Args:
        entry: the catalog entry.
        models_dir: where builtin models are built.
        device: the process's device (under FSDP: loaded on CPU, accelerate shards it).
        plan: the run's memory plan.

    Returns:
        The causal LM (not yet wrapped by PEFT), with :func:`apply_kernels` applied.

    Raises:
        RuntimeError: QLoRA without CUDA or without bitsandbytes; ``LORAFORGE_KERNELS=liger``
            where Liger cannot run.
    """
    from loraforge.catalog.loading import load_model, resolve_weights

    attn = attn_implementation(device.type)
    if plan.strategy == "qlora":
        if device.type != "cuda":
            raise RuntimeError("strategy 'qlora' needs a CUDA device (bitsandbytes 4-bit kernels)")
        _require_bitsandbytes()
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        model = AutoModelForCausalLM.from_pretrained(
            resolve_weights(entry, models_dir),
            quantization_config=quant,
            dtype=torch.bfloat16,
            device_map={"": device.index or 0},
            attn_implementation=attn,
        )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=plan.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        apply_kernels(model, device.type)
        return model
    # FSDP over several processes: every rank loads on CPU (with fsdp_cpu_ram_efficient_loading
    # only rank 0 holds real weights) and accelerate.prepare shards onto the GPUs.
    target = "cpu" if plan.strategy == "fsdp" and world_size() > 1 else str(device)
    model = load_model(entry, models_dir, device=target)
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    # The kernels run where the forward runs: under FSDP the device, not the CPU it loads on.
    apply_kernels(model, device.type)
    return model


def prepare_for_training(model: Any, plan: TrainPlan, device_type: str, dtype: torch.dtype | None) -> Any:
    """Recompute (the plan's first ``k`` layers, :mod:`.recompute`), LoRA input casting and compile.

    Args:
        model: the PEFT model (LoRA layers injected).
        plan: the run's memory plan.
        device_type: ``cpu`` or ``cuda``.
        dtype: the autocast dtype from :func:`compute_dtype` (None: no autocast).

    Returns:
        ``model`` (changed in place).
    """
    # Before compile: each compiled layer then traces the variant its own flag selects.
    apply_activation_checkpointing(model, plan)
    if dtype is not None:
        # Under autocast the LoRA matmuls run in ``dtype`` anyway; PEFT's upcast of the input
        # to the fp32 adapter weights would only add a saved copy per adapted layer.
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if plan.compile and device_type == "cuda":
        # Per decoder layer (as torchtitan does): one small graph reused by every layer (two with
        # partial recompute: checkpointed and not); mask building, the chunked loss and PEFT's
        # Python bookkeeping stay eager.
        for layer in decoder_layers(model):
            layer.compile()
    return model


def make_optimizer(params: list[Any], lr: float, weight_decay: float, device_type: str) -> torch.optim.AdamW:
    """AdamW over the LoRA parameters; the fused CUDA kernel on GPU (one launch for all tensors).

    Args:
        params: the trainable parameters.
        lr: learning rate.
        weight_decay: decoupled weight decay.
        device_type: ``cpu`` or ``cuda``.

    Returns:
        The optimizer.
    """
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device_type == "cuda")
