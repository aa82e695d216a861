"""Whether Liger's kernels actually work here (the choice itself, ``LORAFORGE_KERNELS``, is read by
:func:`loraforge.contracts.trainer_launch.requested_kernels`, which the worker checks too).

The trainer's ``device_setup`` (RMSNorm, SwiGLU, RoPE) and ``loss`` (the fused linear
cross-entropy) both ask :func:`liger_unusable_reason`. One check for both, and a real import
rather than "is the package installed": with ``liger_kernel`` present but Triton broken (a
CUDA/Triton mismatch), an installed-only check picked the fused loss and every single-GPU CUDA job
crashed at setup.
"""

from __future__ import annotations

import functools
import importlib

# What the trainer uses from liger_kernel: the patch functions and the fused loss live here, and
# importing it pulls triton and Liger's ops, which is where a broken install fails.
LIGER_MODULES = ("liger_kernel.transformers",)


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
