"""Operating the service: worker presence, readiness checks and Prometheus metrics.

* ``presence``: each worker process's heartbeat row (which pools it serves, when it last beat);
* ``readiness``: the checks behind the API's ``/readyz`` (database, broker, object store, a live
  worker per train pool, an engine per served base model), each with a reason;
* ``metrics``: the metrics of the API, the engine and the worker, and how each is served
  (``/metrics``; multi-process for an API with several uvicorn workers).

Torch-free and Celery-free, so the API, the worker and the engine can all import it.
"""
