"""The Batch API (``/v1/batches``): chat completions run asynchronously over an uploaded JSONL.

``lines.py`` reads and checks the input file's requests (pure), ``service.py`` creates, lists,
retrieves and cancels batches (the API's side), ``status.py`` names the states. The worker runs
them (``loraforge.worker.batches``).
"""
