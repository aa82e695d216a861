"""Serving: the engine process (base model + hot-loaded LoRA adapters).

Deliberately imports nothing: ``loraforge.serving.app`` stays importable without torch, while
``loraforge.serving.engine`` pulls in torch, transformers and PEFT. Only the engine process (the
``loraforge engine`` command) imports this package; the API and the worker talk to it over HTTP
through ``loraforge.engines``, with the wire models in ``loraforge.contracts.engine``.

    engine.py    Engine: adapter LRU + batched generation (torch)
    batching.py  BatchScheduler: coalesces concurrent requests into batches (no torch)
    generation.py one left-padded, mixed-adapter ``generate`` per batch; per-row stopping (torch)
    app.py       create_engine_app / run_engine: vLLM adapter protocol + OpenAI chat (no torch at import)
    protocol.py  chat wire models; chat.py message helpers; errors.py typed errors
"""
