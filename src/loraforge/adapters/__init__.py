"""The on-disk adapter contract (PEFT pair + manifest.json) and the registry of served adapters."""
