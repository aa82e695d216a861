"""Blob storage for uploaded files, result files and adapters."""
