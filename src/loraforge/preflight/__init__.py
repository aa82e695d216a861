"""Training-data pre-flight: validate JSONL files completely, in one streaming pass, and count their
tokens with the base model's tokenizer and chat template — no torch, no transformers.

``validate_file`` checks structure (after an upload); ``validate_for_model`` / ``check_job`` add the
base model's tokens and the job's rules (at job creation, in a dry run, in ``loraforge validate``).
"""

from loraforge.preflight.estimate import Throughput, default_throughput, estimate_job
from loraforge.preflight.report import MAX_ISSUES, FileReport, Issue, TokenStats
from loraforge.preflight.run import (
    JobCheck,
    check_job,
    job_error,
    make_counter,
    validate_file,
    validate_for_model,
)

__all__ = [
    "MAX_ISSUES",
    "FileReport",
    "Issue",
    "JobCheck",
    "Throughput",
    "TokenStats",
    "check_job",
    "default_throughput",
    "estimate_job",
    "job_error",
    "make_counter",
    "validate_file",
    "validate_for_model",
]
