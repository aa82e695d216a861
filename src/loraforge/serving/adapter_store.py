"""Where the engine gets adapters: the blob store, by key, through a checked local cache.

``POST /v1/load_lora_adapter`` keeps vLLM's shape (``lora_name``, ``lora_path``), but
``lora_path`` is a reference into the adapter store -- ``adapters/{job_id}`` or
``checkpoints/{job_id}/step-N`` (``loraforge.storage``) -- that the engine resolves itself:
it fetches the sealed directory into its own cache (``$LORAFORGE_HOME/cache``), each file checked
against the seal's sha256, and loads that. A path, or anything else, is refused: a caller of
the engine can never make it read an arbitrary directory (vLLM's ``LoRARequest`` warning).
An engine with an empty home loads any adapter the store has, so any replica can serve any
fine-tuned model. No torch here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.serving.errors import AdapterNotFound, AdapterStoreUnavailable, InvalidAdapter
from loraforge.storage import is_adapter_ref
from loraforge.storage.cache import LocalCache, StorageIntegrityError

if TYPE_CHECKING:
    from loraforge.settings import Settings

logger = logging.getLogger(__name__)


class AdapterStore:
    """Resolves ``lora_path`` references to checked local copies.

    Args:
        cache: the engine's cache of the blob store.
    """

    def __init__(self, cache: LocalCache) -> None:
        self.cache = cache

    @classmethod
    def from_settings(cls, settings: Settings) -> AdapterStore:
        """The store ``settings`` name (``LORAFORGE_STORAGE_URL``), cached under the engine's home."""
        from loraforge.storage import local_cache

        return cls(local_cache(settings))

    def resolve(self, name: str, ref: str) -> Path:
        """The local directory of the adapter ``ref``, fetched (and checked) if not cached yet.

        Args:
            name: the adapter's public name (for messages: never a path or a key).
            ref: ``lora_path`` as sent.

        Raises:
            InvalidAdapter: ``ref`` is not an adapter reference (a path, say), or the download does
                not match its checksums.
            AdapterNotFound: the store has no complete adapter there.
            AdapterStoreUnavailable: the store could not be reached.
        """
        if not is_adapter_ref(ref):
            raise InvalidAdapter(
                "lora_path must name an adapter in the adapter store (adapters/<job id> or "
                "checkpoints/<job id>/step-<N>); paths are not accepted.",
                code="invalid_lora_path",
            )
        started = time.monotonic()
        try:
            path = self.cache.directory(ref)
        except FileNotFoundError as exc:
            raise AdapterNotFound(f"Adapter '{name}' is not in the adapter store.") from exc
        except StorageIntegrityError as exc:
            logger.error("adapter %s (%s) failed its checksum: %s", name, ref, exc)
            raise InvalidAdapter(
                f"Adapter '{name}' did not match its checksums in the adapter store."
            ) from exc
        except OSError as exc:
            logger.error("adapter store unreachable fetching %s: %s", ref, exc)
            raise AdapterStoreUnavailable(
                f"The adapter store could not be reached to fetch '{name}'; try again."
            ) from exc
        logger.info("adapter %s ready from the store in %.4fs", name, time.monotonic() - started)
        return path


__all__ = ["AdapterStore"]
