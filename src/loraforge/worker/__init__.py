"""What a worker process does with a job, outside Celery (``loraforge.queue.tasks`` calls in).

``training`` takes the job's lease and supervises ``python -m loraforge.trainer`` (its JSON lines
are applied by ``progress``); ``admission`` and ``gpu_leases`` decide whether a job may start on
this host now; ``reaper`` re-queues jobs whose worker died; ``results`` writes the result file;
``artefacts`` says where a run's files live. Never imports torch.
"""
