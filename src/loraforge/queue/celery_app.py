"""The one Celery app. The broker is kombu's filesystem transport under ``$LORAFORGE_HOME``
(no server, FACTS_CPU §5) unless ``LORAFORGE_BROKER_URL`` names Redis or RabbitMQ;
``filesystem:///shared/folder`` puts the filesystem transport's folders there instead (several
processes with their own homes on one machine, or a shared disk)."""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from loraforge.queue.fs_broker import TRANSPORT
from loraforge.queue.routing import DEFAULT_QUEUE
from loraforge.settings import Settings


def create_celery(settings: Settings) -> Celery:
    url = settings.celery_broker_url
    app = Celery("loraforge", broker="filesystem://" if url.startswith("filesystem://") else url)
    conf: dict[str, object] = {
        # Training tasks name their queue when sent (``train.<pool>`` of the job's plan,
        # queue/routing.py); everything else goes to the default queue.
        "task_default_queue": DEFAULT_QUEUE,
        "task_ignore_result": True,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    if url.startswith(("redis://", "rediss://", "sqs://")):
        # An unacknowledged task goes to another worker after this long (a training task is
        # unacknowledged for its whole run); the job's lease keeps that copy from training.
        timeout = settings.broker_visibility_timeout_seconds
        conf["broker_transport_options"] = {
            "visibility_timeout": timeout,
            # kombu looks for expired unacknowledged tasks every interval x throttle seconds
            # (100 s by default): a short timeout would otherwise not take effect for minutes.
            "unacked_restore_interval": min(10.0, max(1.0, timeout / 3)),
            "unacked_restore_throttle": 1,
        }
    if url.startswith("filesystem://"):
        where = url.removeprefix("filesystem://")
        root = Path(where) if where.startswith("/") else settings.home / "broker"
        folders = {name: root / name for name in ("queue", "processed", "control")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        # kombu's filesystem transport, made atomic (``queue/fs_broker.py`` says why).
        conf["broker_transport"] = TRANSPORT
        conf["broker_transport_options"] = {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
            "polling_interval": settings.broker_poll_seconds,
        }
    app.conf.update(conf)
    return app
