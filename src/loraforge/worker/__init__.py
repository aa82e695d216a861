"""What a worker process does with a job, outside Celery (``loraforge.queue.tasks`` calls in).

``training`` takes the job's lease, writes the trainer's spec (built by ``job_spec``) and
supervises ``python -m loraforge.trainer`` (``trainer_process`` reads its JSON lines as typed
events, ``progress`` applies them); ``admission`` and ``gpu_leases`` decide whether a job may start on
this host now; ``reaper`` re-queues jobs whose worker died; ``results`` writes the result file;
``artefacts`` says where a run's files live. Never imports torch.
"""
