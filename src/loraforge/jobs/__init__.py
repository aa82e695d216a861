"""The fine_tuning.jobs resource: parameters, the state machine and its events, creation,
listing, cancel, pause/resume, the stored placement plan and the job-level file checks."""
