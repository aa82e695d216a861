"""Serving: the engine process (base model + hot-loaded LoRA adapters) and its HTTP client.

Deliberately imports nothing: ``loraforge.serving.client`` must stay importable without torch
(the API process uses it), while ``loraforge.serving.engine`` pulls in torch, transformers and PEFT.

    engine.py    Engine: adapter LRU + batched generation (torch)
    batching.py  BatchScheduler: coalesces concurrent requests into batches (no torch)
    generation.py one left-padded, mixed-adapter ``generate`` per batch; per-row stopping (torch)
    app.py       create_engine_app / run_engine: vLLM adapter protocol + OpenAI chat (no torch at import)
    client.py    EngineClient: httpx client for the API process and the worker (no torch)
    protocol.py  wire models; chat.py message helpers; errors.py typed errors
"""
