"""The typed contracts between loraforge's processes, in one neutral package that both sides import.

Pure pydantic (no torch, no database, no HTTP framework): the spec the worker hands the trainer
and the events the trainer prints back, the hyperparameter rules the API, pre-flight and trainer
share, the engine's adapter protocol, and OpenAI's error envelope.
"""
