"""Base-model catalog (configs/models.yaml) and base-model loading.

``catalog`` is pure (no torch) so the API can use it; ``loading`` and ``tiny_llama`` import torch
lazily, inside their functions.
"""

from loraforge.catalog.catalog import BaseModelEntry, Catalog, LoraDefaults, load_catalog

__all__ = ["BaseModelEntry", "Catalog", "LoraDefaults", "load_catalog"]
