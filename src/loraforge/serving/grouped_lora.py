"""Grouped LoRA for mixed-adapter batches (punica / S-LoRA style) on top of PEFT's LoRA layers.

PEFT's mixed-batch path (``generate(..., adapter_names=[...])``) runs, in every LoRA layer and
every decode step, one gather + two small matmuls + one scatter-add *per distinct adapter* in the
batch, so its cost grows with the number of adapters in flight. Here every LoRA ``Linear`` keeps
the resident adapters' factors stacked in *slots*::

    a: (slots, in_features, r_max)    A^T, zero-padded to the layer's largest resident rank
    b: (slots, r_max, out_features)   B^T * scaling (the scaling folded in once, at load)

Slot 0 stays zero: it is the base model's row. A batch then costs the same per layer whatever its
mix of adapters: ``base(x) + bmm(bmm(x, a[idx]), b[idx])`` with ``idx`` the per-row slot, one
gather of each stack per layer. A batch whose rows all use one adapter runs two plain matmuls on
that slot's views (no gather); an all-base batch skips LoRA entirely.

PEFT stays the loader and the owner of the weights (``PeftModel.load_adapter`` /
``delete_adapter``): :class:`GroupedLora` copies each adapter's factors into a slot after PEFT
loaded it and frees the slot when it is deleted. The installed forward only takes over inside
:meth:`GroupedLora.route`; everywhere else (training, direct use of the ``PeftModel``, the
``adapter_names`` path) the layer runs PEFT's own forward.

Not handled here (such adapters keep PEFT's path, see :meth:`GroupedLora.supports`): LoRA
variants (DoRA, aLoRA, ...), LoRA bias terms, and LoRA on anything but ``nn.Linear`` (embeddings,
convolutions) or on quantised base layers. The serving targets refuse most of these anyway.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

__all__ = ["BASE_ROW", "GroupedLora"]

# PEFT's name for "no adapter" in ``adapter_names`` (peft.tuners.lora.layer._mixed_batch_forward).
BASE_ROW = "__base__"

# Mixed batches gather each layer's per-row factors once per ``generate`` call and reuse them for
# every decode step when all of them together stay under this size: on a CPU (or any
# dispatch-bound model) that halves the extra ops per layer. Above it (an 8B model with many rows)
# they are gathered in every forward, which on a GPU costs little next to the base matmul and
# keeps memory flat in the batch size.
GATHER_CACHE_BYTES = 64 * 2**20

# A PEFT ``LoraLinear``. Typed loosely: its ``lora_A``/``scaling``/... are dynamic module
# attributes that type checkers see as ``Tensor | Module``.
_LoraModule = Any


class _Slots:
    """The stacked LoRA factors of one ``LoraLinear`` for every slot (slot 0: zeros)."""

    def __init__(self, module: _LoraModule, dtype: torch.dtype, slots: int) -> None:
        base: nn.Linear = module.get_base_layer()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.device = base.weight.device
        self.dtype = dtype
        self.ranks = [0] * slots  # this layer's rank of the adapter in each slot (0: none)
        self.a = torch.zeros((slots, self.in_features, 0), dtype=dtype, device=self.device)
        self.b = torch.zeros((slots, 0, self.out_features), dtype=dtype, device=self.device)

    def write(self, slot: int, module: _LoraModule, name: str) -> None:
        """Copy adapter ``name``'s factors of ``module`` into ``slot`` (widening the stacks if needed)."""
        a_weight: torch.Tensor = module.lora_A[name].weight  # (r, in)
        b_weight: torch.Tensor = module.lora_B[name].weight  # (out, r)
        rank = int(a_weight.shape[0])
        self.ranks[slot] = rank
        self._fit(len(self.ranks), max(self.ranks))
        with torch.no_grad():
            self.a[slot].zero_()
            self.b[slot].zero_()
            self.a[slot, :, :rank].copy_(a_weight.t())
            # PEFT computes lora_B(lora_A(x)) * scaling; scaling B once here saves an op per step.
            self.b[slot, :rank, :].copy_(b_weight.t() * module.scaling[name])

    def clear(self, slot: int) -> None:
        """Zero ``slot`` (so a stale adapter can never be served from it)."""
        self.ranks[slot] = 0
        with torch.no_grad():
            self.a[slot].zero_()
            self.b[slot].zero_()

    def resize(self, slots: int) -> None:
        """Hold exactly ``slots`` slots, padded only to the largest rank still resident."""
        self.ranks = (self.ranks + [0] * slots)[:slots]
        self._fit(slots, max(self.ranks))

    def _fit(self, slots: int, rank: int) -> None:
        """Reallocate the stacks to ``slots`` x ``rank`` when their shape differs.

        Slicing alone would keep the old storage alive; the copy is what releases the memory of an
        unloaded adapter (or of the padding a departed high-rank adapter forced on the others).
        """
        if self.a.shape[0] == slots and self.a.shape[2] == rank:
            return
        a = torch.zeros((slots, self.in_features, rank), dtype=self.dtype, device=self.device)
        b = torch.zeros((slots, rank, self.out_features), dtype=self.dtype, device=self.device)
        keep_s, keep_r = min(slots, self.a.shape[0]), min(rank, self.a.shape[2])
        a[:keep_s, :, :keep_r] = self.a[:keep_s, :, :keep_r]
        b[:keep_s, :keep_r, :] = self.b[:keep_s, :keep_r, :]
        self.a, self.b = a, b

    def row_bytes(self) -> int:
        """Bytes one batch row's gathered factors take."""
        return (self.in_features + self.out_features) * self.a.shape[2] * self.a.element_size()


_Plan = tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class _Call:
    """The routing of one ``generate`` call: which slot each batch row uses."""

    slots: list[int]
    rows: torch.Tensor | None  # per-row slot ids on the device, for mixed batches
    cache: bool  # keep each layer's gathered factors for the whole call
    plans: dict[_Slots, _Plan] = field(default_factory=dict)

    def plan(self, layer: _Slots) -> _Plan:
        """This layer's per-row factors ``(B, in, r)``, ``(B, r, out)`` for the call, or None (skip).

        One adapter for all rows: its slot's views broadcast over the rows (no copy, no gather).
        Mixed: a gather of each stack, cut to the largest rank among the rows. Views and skips are
        kept for the whole call; gathers only if ``cache``.
        """
        try:
            return self.plans[layer]  # every decode step after the first (prefill) forward
        except KeyError:
            pass
        distinct = set(self.slots)
        rank = max(layer.ranks[s] for s in distinct)
        plan: _Plan
        if rank == 0:  # no row's adapter touches this layer
            plan = None
        elif len(distinct) == 1:
            (slot,) = distinct
            n = len(self.slots)
            plan = layer.a[slot, :, :rank].expand(n, -1, -1), layer.b[slot, :rank, :].expand(n, -1, -1)
        else:
            assert self.rows is not None
            idx = self.rows.to(layer.device)  # a no-op unless the model spans devices
            plan = layer.a[:, :, :rank].index_select(0, idx), layer.b[:, :rank, :].index_select(0, idx)
            if not self.cache:
                return plan
        self.plans[layer] = plan
        return plan


class _Route:
    """Holds the :class:`_Call` in progress (None: PEFT's own forward); shared by all layers."""

    call: _Call | None = None


class _GroupedLinear(LoraLinear):
    """PEFT's ``LoraLinear`` with the grouped forward; :meth:`GroupedLora._install` swaps it in.

    Swapping the class (rather than setting a bound ``forward`` on each instance) keeps the module
    free of a reference cycle through itself, so an unloaded model is freed by reference counting.
    """

    _lf_slots: _Slots
    _lf_route: _Route

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x)`` plus each row's adapter inside a routed call; PEFT's forward otherwise."""
        call = self._lf_route.call
        if call is None or self.training:
            return super().forward(x, *args, **kwargs)
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        plan = call.plan(self._lf_slots)
        if plan is None:
            return result
        a, b = plan
        lora_x = x if x.dtype == a.dtype else x.to(a.dtype)
        if x.dim() == 3 and result.dtype == a.dtype:  # (B, T, in): the add rides on the 2nd bmm
            return torch.baddbmm(result, lora_x.bmm(a), b)
        per_row = lora_x.reshape(a.shape[0], -1, a.shape[1])
        return result + per_row.bmm(a).bmm(b).to(result.dtype).view_as(result)


class GroupedLora:
    """Slot-stacked LoRA factors for every ``LoraLinear`` of a ``PeftModel``, kept in sync with it.

    Call :meth:`add` after PEFT loaded an adapter and :meth:`remove` after PEFT deleted one; run a
    batch inside :meth:`route` to have every LoRA layer apply each row's adapter in one grouped
    op. The caller serialises all of these with generation (the engine's model lock).

    Args:
        model: the ``PeftModel`` (its LoRA layers get the grouped forward installed).
        max_slots: most adapters resident at once (the engine's ``max_loaded_adapters``); the
            stacks never hold more than ``max_slots + 1`` slots.
    """

    def __init__(self, model: nn.Module, max_slots: int) -> None:
        self._model = model
        self.max_slots = max_slots
        self._route = _Route()
        self._layers: dict[_LoraModule, _Slots] = {}
        self._slot_of: dict[str, int] = {}
        self._unsupported: set[str] = set()

    @property
    def num_slots(self) -> int:
        """Slots the stacks hold now: the highest slot in use plus one (slot 0 is the base)."""
        return max(self._slot_of.values(), default=0) + 1

    def slot_of(self, name: str) -> int | None:
        """The slot of PEFT adapter ``name`` (None: not in a slot)."""
        return self._slot_of.get(name)

    def supports(self, names: Sequence[str]) -> bool:
        """Whether a batch whose rows use PEFT adapters ``names`` (or ``__base__``) can be routed.

        False while any resident adapter is beyond the grouped path: the LoRA modules this class
        does not drive would add that adapter (if active) to every row of a routed batch.
        """
        return not self._unsupported and all(n == BASE_ROW or n in self._slot_of for n in names)

    def add(self, name: str) -> bool:
        """Give the just-loaded PEFT adapter ``name`` a slot and copy its factors into it.

        The lowest free slot is taken, so an evicted adapter's slot goes to the next one loaded and
        the stacks grow only while more adapters are resident than ever before.

        Returns:
            True if the adapter is served grouped; False if it is beyond the grouped path (then
            :meth:`supports` is False until it is removed).

        Raises:
            RuntimeError: ``max_slots`` adapters hold slots already.
        """
        if name in self._slot_of or name in self._unsupported:
            return name in self._slot_of
        modules: list[_LoraModule] = [
            m
            for m in self._model.modules()
            if isinstance(m, LoraLayer) and any(name in getattr(m, k) for k in m.adapter_layer_names)
        ]
        config = getattr(self._model, "peft_config", {}).get(name)
        # Extra trained modules (modules_to_save, trainable tokens) follow PEFT's *active* adapter,
        # not the rows' slots: only PEFT's own path applies them per row.
        extras = config is not None and (
            getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None)
        )
        if extras or not modules or not all(self._groupable(m, name) for m in modules):
            self._unsupported.add(name)
            return False
        used = set(self._slot_of.values())
        slot = next(s for s in range(1, self.max_slots + 2) if s not in used)
        if slot > self.max_slots:
            raise RuntimeError(f"all {self.max_slots} LoRA slots are taken")
        self._slot_of[name] = slot
        for module in modules:
            if module not in self._layers:
                self._install(module)
        for layer in self._layers.values():  # every stack must index every slot (mixed gathers)
            layer.resize(self.num_slots)
        for module in modules:
            self._layers[module].write(slot, module, name)
        return True

    def remove(self, name: str) -> None:
        """Free adapter ``name``'s slot and release what only it needed (a no-op if unknown)."""
        self._unsupported.discard(name)
        slot = self._slot_of.pop(name, None)
        if slot is None:
            return
        for layer in self._layers.values():
            # A layer left without adapters keeps empty (rank-0) stacks: PEFT keeps the module.
            layer.clear(slot)
            layer.resize(self.num_slots)

    @contextmanager
    def route(self, names: Sequence[str]) -> Iterator[None]:
        """Within this block, the model's forwards apply row i's adapter ``names[i]`` (grouped).

        Args:
            names: the PEFT adapter of each batch row, ``__base__`` for the base model; the rows
                must stay these for the whole block (one ``generate`` call; no beam search, whose
                expanded rows would not match).

        Raises:
            ValueError: an adapter without a slot (check :meth:`supports` first).
        """
        if not self.supports(names):
            raise ValueError(f"adapters without a LoRA slot in {sorted(set(names))}")
        slots = [0 if n == BASE_ROW else self._slot_of[n] for n in names]
        rows = None
        if len(set(slots)) > 1:
            device = next(iter(self._layers.values())).device
            rows = torch.tensor(slots, dtype=torch.long, device=device)
        row_bytes = sum(layer.row_bytes() for layer in self._layers.values())
        self._route.call = _Call(slots, rows, cache=len(slots) * row_bytes <= GATHER_CACHE_BYTES)
        try:
            yield
        finally:
            self._route.call = None

    def _install(self, module: _LoraModule) -> None:
        """Give ``module`` its stacks and the grouped forward."""
        dtype: torch.dtype = next(iter(module.lora_A.values())).weight.dtype  # PEFT may keep LoRA in fp32
        module._lf_slots = _Slots(module, dtype, self.num_slots)
        module._lf_route = self._route
        module.__class__ = _GroupedLinear
        self._layers[module] = module._lf_slots

    @staticmethod
    def _groupable(module: _LoraModule, name: str) -> bool:
        """Plain LoRA on an ``nn.Linear``: what the stacks represent exactly."""
        return (
            type(module) in (LoraLinear, _GroupedLinear)
            and name in module.lora_A
            and isinstance(module.get_base_layer(), nn.Linear)
            and name not in module.lora_variant
            and not module.lora_bias.get(name, False)
            and not module.merged
        )
