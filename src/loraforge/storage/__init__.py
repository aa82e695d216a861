"""The blob store: uploaded files, upload parts, result files and adapters, through fsspec."""
