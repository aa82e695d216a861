"""The engine's model and its LoRA adapters: PEFT wrapping, hot-load, delete, grouped slots (torch).

PEFT is the loader and the owner of the adapter weights; :class:`AdapterHost` keeps the
:class:`~loraforge.serving.grouped_lora.GroupedLora` slots in step with every PEFT load and
delete, so batches can run through the grouped path. It does no locking: the engine calls it
under its model lock.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from typing import Any

import torch
from peft import PeftModel

from loraforge.serving.errors import InvalidAdapter
from loraforge.serving.grouped_lora import GroupedLora
from loraforge.serving.lora import LoadedAdapter

__all__ = ["AdapterHost"]


class AdapterHost:
    """The base model, wrapped in a ``PeftModel`` while at least one adapter is loaded.

    Args:
        model: the bare base model.
        max_adapters: most adapters resident at once (the size of the grouped slots).

    Attributes:
        model: the bare base model, or the ``PeftModel`` wrapping it when ``peft``.
        peft: whether any adapter is loaded (PEFT breaks when its last adapter is deleted, so the
            LoRA layers are stripped then and the bare model returns).
        grouped: the grouped slots while ``peft``, else None. They are kept even when the engine
            runs PEFT's own paths, so the two can be switched per batch (the benchmark does).
    """

    def __init__(self, model: Any, max_adapters: int) -> None:
        self.model = model.eval()
        self.peft = False
        self.grouped: GroupedLora | None = None
        self.max_adapters = max_adapters
        self._device = next(model.parameters()).device

    def attach(self, adapter: LoadedAdapter) -> None:
        """Load ``adapter`` with PEFT and give it a grouped slot.

        Raises:
            InvalidAdapter: PEFT could not load it (nothing of it is left in the model).
        """
        key = adapter.peft_name
        try:
            if not self.peft:
                self.model = PeftModel.from_pretrained(
                    self.model, str(adapter.path), adapter_name=key, is_trainable=False
                ).eval()
                self.peft = True
                self.grouped = GroupedLora(self.model, self.max_adapters)
            else:
                self.model.load_adapter(str(adapter.path), adapter_name=key, is_trainable=False)
        except Exception as exc:
            if self.peft and key in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(key)
            # PEFT's messages name the directory: callers must not learn where adapters are kept.
            reason = str(exc).replace(str(adapter.path), "<adapter>")
            raise InvalidAdapter(f"PEFT could not load the adapter: {reason}") from exc
        if self.grouped is not None:
            try:
                self.grouped.add(key)  # False for adapters PEFT's path must serve: still servable
            except Exception as exc:
                # E.g. out of memory growing the slot stacks: leave no half-registered adapter
                # behind (a retry under the same name would collide inside PEFT).
                with contextlib.suppress(Exception):  # best effort: the stacks may be short
                    self.grouped.remove(key)
                self.model.delete_adapter(key)
                raise InvalidAdapter(f"could not make room for the adapter: {exc}") from exc

    def detach(self, adapter: LoadedAdapter, last: bool) -> None:
        """Delete ``adapter`` from the model and its slot, releasing the memory at once.

        Args:
            adapter: a loaded adapter.
            last: it is the only one loaded: strip the LoRA layers entirely.
        """
        if last:
            self.model = self.model.unload().eval()
            self.peft = False
            self.grouped = None
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "deleted the active adapter, switching to ..."
                self.model.delete_adapter(adapter.peft_name)
            if self.grouped is not None:
                self.grouped.remove(adapter.peft_name)
        # The LoRA tensors are unreachable now; collect them (and hand CUDA blocks back) at once
        # instead of whenever the allocator or the cycle collector gets to it.
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
