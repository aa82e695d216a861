"""The Files and Uploads resources: ``service`` (``/v1/files``) and ``uploads`` (``/v1/uploads``).

Bytes live in the blob store (``loraforge.storage``); these modules own the database rows, the
purpose and size rules, and the chunked-upload state machine. Raise domain errors; know no HTTP.
"""
