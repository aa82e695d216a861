"""Peak accelerator memory of one LoRA training run, per device, from the model's shapes.

Pure arithmetic (no torch): the API process sizes every job with it at creation.

Notation: ``h`` hidden size, ``I`` intermediate size, ``L`` layers, ``kv`` the k/v projection
width (``num_key_value_heads * head_dim``), ``V`` vocabulary, ``r`` LoRA rank, ``n`` adapted
modules per layer, ``a`` bytes per activation element (2 for bf16, 4 for an fp32 model),
``N`` tokens in one micro-batch (packed: the real tokens; padded: the padded ones).

**Activations saved for backward, per token per layer** (HF Llama block, frozen base, LoRA on
``n`` linear projections, sdpa/flash attention, no ``torch.compile``)::

    A = a * (8h + 2kv + 4I + r*n)

In bf16 that is ``16h + 4kv + 8I + 2rn`` bytes. Enumerated: each RMSNorm keeps an fp32 copy of its
input (4h) and its output (2h, the LoRA-A input shared by q/k/v, resp. gate/up); attention keeps
q (2h), k and v (2kv each: GQA-aware kernels do not repeat kv heads), its output (2h) and a
per-head log-sum-exp (flash/memory-efficient kernels: no ``N x N`` term); o_proj keeps its input
(2h); the SwiGLU MLP keeps gate, up, silu(gate) and the down input (2I each); each LoRA-A output
is ``2r``. That sum is 18h; autograd's saved-tensor hooks on the real stack (transformers 5.24 +
peft 0.21, bf16 LoRA weights, ``torch.autograd.graph.saved_tensors_hooks`` counting unique
storages over 2- vs 4-layer models on CPU) measured exactly ``16h + 4kv + 8I + 14r`` for n = 7, so
one h-sized tensor is shared and 16h is used. Frozen base weights save no inputs (autograd only
saves what a gradient that is needed uses). With PEFT's default fp32 adapter weights (bf16 base)
every LoRA layer keeps an fp32 *copy* of its input and the measurement gives
``36h + 4kv + 10I + 28r``: the trainer must compute its adapters in bf16 (autocast, upcast off)
for this plan to hold. Cross-check: torchtune's Llama-3.2-3B row (PERF.md §2, packing, no AC, no
compile, full CE: 60.0 GiB) implies 114 kB/token/layer for the blocks; the formula gives 119 kB.

**Peak activation memory of a micro-batch of N tokens**, ``k`` of the ``L`` blocks checkpointed::

    without checkpointing (k = 0): N * (L*A + E) + max(loss, N*A)
    with checkpointing (k = L):    N * (L*a*h + E) + max(loss, 2*N*A)
    partial (0 < k < L):           N * ((L-k)*A + k*a*h + E) + max(loss, N*A)

``E = 3*a*h`` per token outside the blocks (embedding output, final norm, lm_head input). The
second term is the larger of two moments that never overlap: the loss's logits (freed before the
first block's backward) and one block's backward workspace (its gradients, about one more ``A``;
with checkpointing also that block's recomputed activations). Checkpointing keeps only each
block's input (``a*h`` per token per layer).

Partial: at the end of the forward pass each of the ``L-k`` blocks that keep their activations
holds ``A`` per token and each checkpointed one its input ``a*h``: the first term, whose ends are
the two cases above. The trainer checkpoints the *first* ``k`` blocks (trainer/recompute.py), and
backward runs from the last block down: while ``k < L`` the first backward is that of a block
that kept its activations (workspace ``N*A``), and the first recompute (workspace ``2*N*A``) comes
after the ``L-k`` kept blocks have freed ``(L-k)*N*A >= N*A``, so it never raises the peak:
the transient stays ``max(loss, N*A)``; only at ``k = L`` does a recompute meet the full saved set.
(Checkpointing the last block instead would cost one more ``N*A`` for nothing.) So memory falls
by ``N*(A - a*h)`` per checkpointed block, and the step's compute grows by about ``k/L`` of the
full-recompute cost (one more forward of those blocks).

**Loss**: cross-entropy over ``V`` logits costs ``12 * V`` bytes per token at its peak (backward
of the log-softmax: its saved fp32 output 4, the incoming gradient 4 and the input gradient 4; in
forward, bf16 logits 2 + fp32 upcast 4 + log-softmax 4 = 10). Chunked cross-entropy keeps only
``CE_CHUNK_TOKENS`` tokens' logits alive.

**Calibration** against every GPU measurement there is (``../shared/FACTS_GPU.md``, H200, stock
transformers + PEFT with full fp32-upcast logits, ``torch.cuda.max_memory_allocated``;
tests/unit/test_planner.py re-derives them): the issue's naive baseline (padded, AC; its peak
steps are the widest padded batches, 8,020 and 17,528 tokens) measured 29.1 / 45.2 GiB, the model
gives 29.2 / 45.4 (the 12 V term dominates here); stock packing with flex attention, 8,192 tokens
without AC (PEFT's fp32-adapter activations, the ``A`` term dominates) 96.3 -> 99.6; 16,384
tokens with AC 43.1 -> 43.4. The estimate errs high by 0.4-3.4 %.

**Weights** (bytes per parameter): the catalog dtype (bf16 2, fp32 4); QLoRA stores the block
linears in NF4 (``NF4_BYTES_PER_PARAM``) and the embedding, lm_head and norms in fp32 (see
``QLORA_OTHER_BYTES_PER_PARAM``), plus one dequantised bf16 copy of the largest linear in forward
and one in backward; FSDP shards everything over the N GPUs and holds gathered the root unit
(embedding, lm_head) and two blocks (the current one and the prefetched next). LoRA trainables
cost ``LORA_STATE_BYTES_PER_PARAM`` (FSDP: sharded too).

**What the trainer must do for these numbers to hold** (trainer/device_setup.py and loss.py do
it): bf16 activations (LoRA weights fp32 but the forward under bf16 autocast with PEFT's input
upcast off), chunked cross-entropy of at most ``CE_CHUNK_TOKENS`` rows at a time on CUDA,
attention without an ``N x N`` tensor on CUDA (flex_attention or sdpa's flash/efficient kernels;
on CPU the dense packing mask costs ``N^2`` bytes, negligible at CPU sizes).

**Device overhead**: ``CUDA_RESERVED_GIB`` outside PyTorch's allocator plus
``ALLOCATOR_HEADROOM`` of the device kept free for fragmentation: a plan fits when
``weights + gathered + LoRA states + activations + loss + reserved <= (1 - headroom) * memory``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from loraforge.catalog.catalog import ModelArch

GIB = 2**30

Strategy = Literal["lora", "qlora", "fsdp"]
Device = Literal["cuda", "cpu"]

# Bytes per weight of the frozen base in the catalog dtype.
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
# bitsandbytes NF4 as trainer/device_setup.py loads it (blocksize 64, double quantisation):
# 4-bit codes (0.5 B) + an 8-bit absmax per 64 weights (1/64 B) + an fp32 scale per 256 absmax.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# QLoRA's other weights (embedding, lm_head, norms): peft's prepare_model_for_kbit_training,
# which the trainer calls, upcasts every non-4-bit parameter to fp32.
QLORA_OTHER_BYTES_PER_PARAM = 4
# LoRA trainables in fp32 master weights: weight 4 + gradient 4 + AdamW exp_avg 4 + exp_avg_sq 4.
LORA_STATE_BYTES_PER_PARAM = 16
# Peak bytes per logit of cross-entropy (calibrated on the naive baseline, see above).
CE_BYTES_PER_LOGIT = 12
# Tokens whose logits a chunked cross-entropy keeps alive at once: trainer/loss.py CHUNK_ROWS
# (each chunk under checkpointing, so one chunk's logits exist at a time); keep the two equal.
CE_CHUNK_TOKENS = 4096
# CUDA context (~0.5-1 GiB), cuBLAS/NCCL workspaces, Triton/compile scratch: not in
# torch.cuda.max_memory_allocated, so not in the calibration anchors either.
CUDA_RESERVED_GIB = 2.5
# Device memory left free for allocator fragmentation and estimate error.
ALLOCATOR_HEADROOM = 0.10
# The same rules on a CPU worker: the OS, the API and the engine share its RAM.
CPU_RESERVED_GIB = 2.5

# (in_features, out_features) of each Llama linear, from the arch.
_SHAPES = {
    "q_proj": lambda m: (m.hidden_size, m.hidden_size),
    "k_proj": lambda m: (m.hidden_size, m.kv_size),
    "v_proj": lambda m: (m.hidden_size, m.kv_size),
    "o_proj": lambda m: (m.hidden_size, m.hidden_size),
    "gate_proj": lambda m: (m.hidden_size, m.intermediate_size),
    "up_proj": lambda m: (m.hidden_size, m.intermediate_size),
    "down_proj": lambda m: (m.intermediate_size, m.hidden_size),
}


def _linear_shape(arch: ModelArch, module: str) -> tuple[int, int]:
    # An unknown module name is sized as the largest projection (over- rather than under-estimate).
    shape = _SHAPES.get(module.rsplit(".", 1)[-1])
    return shape(arch) if shape else (arch.hidden_size, arch.intermediate_size)


def block_linear_params(arch: ModelArch) -> int:
    """Parameters of one block's seven linear projections."""
    return sum(i * o for i, o in (shape(arch) for shape in _SHAPES.values()))


def total_params(arch: ModelArch) -> int:
    """All parameters: blocks (linears + 2 norms), embedding, lm_head (unless tied), final norm."""
    h, v = arch.hidden_size, arch.vocab_size
    blocks = arch.num_hidden_layers * (block_linear_params(arch) + 2 * h)
    return blocks + v * h * (1 if arch.tie_word_embeddings else 2) + h


def lora_params(arch: ModelArch, r: int, target_modules: list[str]) -> int:
    """Trainable LoRA parameters: ``r * (in + out)`` per adapted module per block."""
    per_layer = sum(r * sum(_linear_shape(arch, m)) for m in dict.fromkeys(target_modules))
    return arch.num_hidden_layers * per_layer


@dataclass(frozen=True)
class RunShape:
    """What is being trained: the model, its LoRA and the weights dtype."""

    arch: ModelArch
    lora_r: int
    target_modules: tuple[str, ...]
    dtype: str = "bfloat16"

    @property
    def weight_bytes(self) -> int:
        """Bytes per base weight (and per activation element) in the catalog dtype."""
        return DTYPE_BYTES.get(self.dtype, 4)

    def layer_activation_bytes(self, elem_bytes: int, fp32_adapter_inputs: bool = False) -> float:
        """``A``: bytes saved for backward per token per block (module docstring).

        Args:
            elem_bytes: ``a``, bytes per activation element (2: bf16 compute, 4: fp32).
            fp32_adapter_inputs: stock PEFT on a bf16 base (fp32 adapters, input upcast on): each
                adapted module keeps an fp32 copy of its input and an fp32 LoRA-A output, and
                the bf16 norm outputs / down input they would have shared are no longer kept.
                Only for reproducing stock-stack measurements; the trainer turns the upcast off.
        """
        m = self.arch
        h, inter = m.hidden_size, m.intermediate_size
        targets = {t.rsplit(".", 1)[-1] for t in self.target_modules}
        base = elem_bytes * (8 * h + 2 * m.kv_size + 4 * inter + self.lora_r * len(targets))
        if not fp32_adapter_inputs:
            return base
        copies = sum(4 * _linear_shape(m, t)[0] + 2 * self.lora_r for t in targets)
        freed = 2 * h * bool(targets & {"q_proj", "k_proj", "v_proj"})
        freed += 2 * h * bool(targets & {"gate_proj", "up_proj"}) + 2 * inter * ("down_proj" in targets)
        return base + copies - freed


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one device (bytes per component) for one micro-batch size."""

    strategy: Strategy
    device: Device
    num_devices: int
    tokens: int
    checkpointing: bool  # some block recomputes (checkpoint_layers > 0)
    checkpoint_layers: int  # k: the first k blocks recompute
    layers: int  # L: the model's blocks
    weights: float
    gathered: float  # FSDP all-gathered blocks, or QLoRA's dequantised linears
    lora_states: float
    activations: float  # saved for backward: all of a kept block's, a checkpointed block's input
    transient: float  # max(loss logits, one block's backward workspace): they never overlap
    reserved: float  # outside the allocator (CUDA context, workspaces)

    @property
    def allocated(self) -> float:
        """What ``torch.cuda.max_memory_allocated`` would report (no context, no fragmentation)."""
        return self.weights + self.gathered + self.lora_states + self.activations + self.transient

    @property
    def peak(self) -> float:
        """Peak bytes on the device, reserved overhead included."""
        return self.allocated + self.reserved

    def fits(self, memory_gib: float) -> bool:
        """Whether the peak leaves ``ALLOCATOR_HEADROOM`` of a ``memory_gib`` device free."""
        return self.peak <= (1 - ALLOCATOR_HEADROOM) * memory_gib * GIB

    def breakdown_gib(self) -> dict[str, float]:
        """GiB per component (two decimals), for events and the dry run."""
        parts = {
            "weights": self.weights,
            "gathered_or_dequantized": self.gathered,
            "lora_params_grads_adamw": self.lora_states,
            "activations": self.activations,
            "loss_or_backward_workspace": self.transient,
            "cuda_context_and_workspaces" if self.device == "cuda" else "process_overhead": self.reserved,
        }
        parts["total"] = self.peak
        return {k: round(v / GIB, 2) for k, v in parts.items()}


def estimate(
    shape: RunShape,
    *,
    strategy: Strategy,
    device: Device,
    tokens: int,
    checkpointing: bool = False,
    checkpoint_layers: int | None = None,
    num_devices: int = 1,
    chunked_loss: bool | None = None,
    fp32_adapter_inputs: bool = False,
) -> MemoryEstimate:
    """Peak memory per device of one micro-batch of ``tokens`` tokens.

    Args:
        shape: the model, LoRA and dtype.
        strategy: ``lora`` (catalog dtype), ``qlora`` (NF4 base) or ``fsdp`` (sharded bf16).
        device: ``cuda`` or ``cpu``.
        tokens: tokens in the micro-batch.
        checkpointing: whether blocks recompute their activations in backward (all or none).
        checkpoint_layers: how many blocks recompute (the first ``k``); None follows
            ``checkpointing``. Clamped to ``[0, L]``.
        num_devices: GPUs the run is sharded over (FSDP); 1 otherwise.
        chunked_loss: chunked cross-entropy (default: on CUDA, the trainer's ``loss: auto``).
        fp32_adapter_inputs: the stock PEFT stack (see :meth:`RunShape.layer_activation_bytes`),
            for reproducing the calibration anchors.

    Returns:
        The estimate, per component.
    """
    arch = shape.arch
    h, n_layers, vocab = arch.hidden_size, arch.num_hidden_layers, arch.vocab_size
    a = shape.weight_bytes if strategy == "lora" else 2  # QLoRA/FSDP compute in bf16
    n = num_devices if strategy == "fsdp" else 1
    params = total_params(arch)
    block_linears = n_layers * block_linear_params(arch)
    largest_linear = max(i * o for i, o in (s(arch) for s in _SHAPES.values()))

    gathered, weights = 0.0, 0.0
    if strategy == "qlora":
        weights = block_linears * NF4_BYTES_PER_PARAM + (params - block_linears) * QLORA_OTHER_BYTES_PER_PARAM
        gathered = 2 * largest_linear * 2
    elif strategy == "fsdp":
        weights = params * 2 / n
        # FSDP2 keeps the root unit (embedding, lm_head, final norm) gathered from forward to
        # backward, plus the current block and the prefetched next one.
        block = block_linear_params(arch) + 2 * h
        gathered = ((params - n_layers * block) + 2 * block) * 2
    else:
        weights = float(params * shape.weight_bytes)
    lora_states = lora_params(arch, shape.lora_r, list(shape.target_modules)) * LORA_STATE_BYTES_PER_PARAM / n

    per_layer = shape.layer_activation_bytes(a, fp32_adapter_inputs)
    outside = 3 * a * h
    k = (n_layers if checkpointing else 0) if checkpoint_layers is None else checkpoint_layers
    k = max(0, min(k, n_layers))
    # Kept blocks hold A per token, checkpointed ones their input (module docstring, "partial").
    saved = float(tokens * ((n_layers - k) * per_layer + k * a * h + outside))
    # A recompute (the recomputed block + its backward) meets the full saved set only when every
    # block is checkpointed; otherwise the first backward is a kept block's (its gradients only).
    workspace = (2 if k == n_layers else 1) * tokens * per_layer
    chunked = device == "cuda" if chunked_loss is None else chunked_loss
    loss_tokens = min(tokens, CE_CHUNK_TOKENS) if chunked else tokens
    loss = float(loss_tokens * vocab * CE_BYTES_PER_LOGIT)
    reserved = (CUDA_RESERVED_GIB if device == "cuda" else CPU_RESERVED_GIB) * GIB
    return MemoryEstimate(
        strategy=strategy,
        device=device,
        num_devices=n,
        tokens=tokens,
        checkpointing=k > 0,
        checkpoint_layers=k,
        layers=n_layers,
        weights=weights,
        gathered=gathered,
        lora_states=lora_states,
        activations=saved,
        transient=max(loss, workspace),
        reserved=reserved,
    )
