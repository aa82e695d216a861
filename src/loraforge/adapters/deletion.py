"""``DELETE /v1/models/{model}``: a fine-tuned model with its checkpoint models, or one checkpoint
model, gone from the registry, the engines and storage.

Deleting a fine-tuned model deletes the checkpoint models of its job too: they are the same
training run, and left behind they would go on answering chat and export, hosting models past
the plan's limit. A checkpoint model (``…:ckpt-step-N``) can be deleted on its own once its job
has finished (while the job runs, its checkpoints are where it resumes from).

Order: the rows go first and are committed (from then on no request resolves the names), then
the engines unload the names (best effort: an engine that is down has nothing loaded, and a name
the registry no longer resolves is never loaded again), then the directories are removed. Every
file removal of a model is in :func:`remove_adapter_files`, the one place that knows where adapters
are stored.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge import storage
from loraforge.adapters import registry
from loraforge.adapters.export import archive_root, drop_cached_exports
from loraforge.db.models import FineTunedModel, Job, JobCheckpoint, Organization
from loraforge.errors import InvalidRequestError, ModelNotFoundError
from loraforge.settings import Settings

log = logging.getLogger(__name__)

# Statuses after which a job writes no more checkpoints (``jobs.state.TERMINAL``'s values; not
# imported: the adapters package does not depend on the job domain).
_FINISHED = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class DeletedModels:
    """What one deletion removed: the name asked for, and every name and directory that went."""

    id: str
    base_model: str
    job_id: str
    names: list[str]
    adapter_paths: list[str]
    # A fine-tuned model (its job's checkpoints went with it), not a lone checkpoint model.
    fine_tuned: bool


def _delete_rows(session: Session, org: Organization, name: str) -> DeletedModels:
    model = session.execute(
        select(FineTunedModel).where(FineTunedModel.id == name, FineTunedModel.org_id == org.id)
    ).scalar_one_or_none()
    if model is not None:
        checkpoints = list(
            session.execute(select(JobCheckpoint).where(JobCheckpoint.job_id == model.job_id)).scalars()
        )
        rows: list[FineTunedModel | JobCheckpoint] = [model, *checkpoints]
        names = [model.id] + [c.fine_tuned_model_checkpoint for c in checkpoints]
        base, job_id, fine_tuned = model.base_model, model.job_id, True
    else:
        checkpoint = registry.get_checkpoint_model(session, org, name)
        if checkpoint is None:
            raise ModelNotFoundError(name)
        status = session.execute(select(Job.status).where(Job.id == checkpoint.job_id)).scalar_one_or_none()
        if status is not None and status not in _FINISHED:
            raise InvalidRequestError(
                f"`{name}` is a checkpoint of job {checkpoint.job_id}, which is {status}: its "
                "checkpoints are where it resumes from. Cancel the job or wait for it to finish.",
                param="model",
                code="job_not_finished",
            )
        rows, names = [checkpoint], [checkpoint.fine_tuned_model_checkpoint]
        base, job_id, fine_tuned = checkpoint.base_model, checkpoint.job_id, False
    paths = [row.adapter_path for row in rows]
    for row in rows:
        session.delete(row)
    session.flush()
    return DeletedModels(name, base, job_id, names, paths, fine_tuned)


def delete_model(
    session: Session,
    settings: Settings,
    org: Organization,
    name: str,
    unload: Callable[[str, Sequence[str]], None],
) -> DeletedModels:
    """Delete the org's fine-tuned model ``name`` (with its job's checkpoint models) or its
    checkpoint model ``name``: rows (committed here), engine copies, files.

    Args:
        session: the request's session; committed here.
        settings: where adapters and exports are stored.
        org: the owner.
        name: a fine-tuned model or checkpoint model id.
        unload: ``EngineFleet.unload``: (base model, names) -> None, best effort.

    Returns:
        What was deleted.

    Raises:
        ModelNotFoundError: the org has no such model.
        InvalidRequestError: a checkpoint of a job that has not finished.
    """
    deleted = _delete_rows(session, org, name)
    session.commit()
    unload(deleted.base_model, deleted.names)
    remove_adapter_files(settings, deleted)
    return deleted


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path != root and path.is_relative_to(root) for root in roots)


def remove_adapter_files(settings: Settings, deleted: DeletedModels) -> None:
    """Remove the deleted models' adapters (in the object store, this machine's cache and the
    trainer's working copies when the job ran here) and their cached exports.

    An adapter reference is a store key (``adapters/<job>``, ``checkpoints/<job>/step-N``): its
    objects go. A legacy host path (a row from before the object store) is removed only when it
    lies inside this machine's adapter folders (``adapters_dir``, ``runs_dir``): a row pointing
    anywhere else is not ours to delete.
    """
    store = storage.open_store(settings)
    roots = [settings.adapters_dir.resolve(), settings.runs_dir.resolve()]
    for raw in deleted.adapter_paths:
        if storage.is_adapter_ref(raw):
            store.delete_prefix(raw)
            storage.local_cache(settings).forget(raw)
            shutil.rmtree(storage.working_copy(settings, raw), ignore_errors=True)
            continue
        path = Path(raw).resolve()
        if storage.is_legacy_path(raw) and _inside(path, roots):
            shutil.rmtree(path, ignore_errors=True)
        else:
            log.warning("not removing %s of %s: outside the adapter store", raw, deleted.id)
    if deleted.fine_tuned:  # the job's models are all gone
        drop_cached_exports(settings, deleted.job_id)
        # The job's tokenized training data, if a run left it here (``worker/artefacts.py``'s
        # ``data_dir``; the worker drops it when the job ends, this catches an interrupted one).
        shutil.rmtree(settings.runs_dir / deleted.job_id / "data", ignore_errors=True)
        store.delete_prefix(storage.data_prefix(deleted.job_id))
    else:
        prefix = archive_root(deleted.id)
        shutil.rmtree(settings.exports_dir / deleted.job_id / prefix, ignore_errors=True)
        store.delete_prefix(f"{storage.EXPORTS}/{deleted.job_id}/{prefix}")
