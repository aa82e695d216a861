"""The kernel choice (``LORAFORGE_KERNELS``) and whether Liger's kernels actually work here.

Pure (no torch at import): the worker validates ``LORAFORGE_KERNELS`` with
:func:`requested_kernels` before it starts a trainer, and the trainer's ``device_setup`` (RMSNorm,
SwiGLU, RoPE) and ``loss`` (the fused linear cross-entropy) both ask :func:`liger_unusable_reason`.
One check for both, and a real import rather than "is the package installed": with
``liger_kernel`` present but Triton broken (a CUDA/Triton mismatch), an installed-only check
picked the fused loss and every single-GPU CUDA job crashed at setup.
"""

from __future__ import annotations

import functools
import importlib
import os

KERNELS_ENV = "LORAFORGE_KERNELS"
KERNEL_CHOICES = ("auto", "liger", "torch")
# What the trainer uses from liger_kernel: the patch functions and the fused loss live here, and
# importing it pulls triton and Liger's ops, which is where a broken install fails.
LIGER_MODULES = ("liger_kernel.transformers",)


def requested_kernels(value: str | None = None) -> str:
    """The kernel choice: ``value``, else ``$LORAFORGE_KERNELS``, else ``auto``.

    ``torch`` means no Liger anywhere (norms, MLP, RoPE and the loss); ``liger`` means Liger or
    an error; ``auto`` means Liger where it works.

    Args:
        value: an explicit choice (the benchmark's ``--kernels``); None reads the environment.

    Returns:
        ``auto``, ``liger`` or ``torch``.

    Raises:
        ValueError: anything else (a typo must not silently run or benchmark the other path).
    """
    raw = (value if value is not None else os.environ.get(KERNELS_ENV, "")).strip().lower() or "auto"
    if raw not in KERNEL_CHOICES:
        raise ValueError(f"{KERNELS_ENV}={raw!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    return raw


@functools.cache
def liger_unusable_reason() -> str | None:
    """None when Liger's modules import in this process, else why not (cached per process).

    Any exception counts (ImportError without the wheel, but also RuntimeError or AttributeError
    from a Triton or transformers version Liger does not support): all of them mean "not usable".
    Cached because the answer cannot change within the one-job trainer process.
    """
    for name in LIGER_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure means unusable, see above
            return f"liger_kernel does not import: {exc!r}"
    return None


def liger_usable() -> bool:
    """True when Liger's kernels can be used here (:func:`liger_unusable_reason` is None)."""
    return liger_unusable_reason() is None
