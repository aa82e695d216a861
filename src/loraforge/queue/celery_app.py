"""The one Celery app. The broker is kombu's filesystem transport under ``$LORAFORGE_HOME``
(no server, FACTS_CPU §5) unless ``LORAFORGE_BROKER_URL`` names Redis or RabbitMQ."""

from __future__ import annotations

from celery import Celery

from loraforge.queue.fs_broker import TRANSPORT
from loraforge.queue.routing import DEFAULT_QUEUE
from loraforge.settings import Settings


def create_celery(settings: Settings) -> Celery:
    app = Celery("loraforge", broker=settings.celery_broker_url)
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
    if not settings.broker_url:
        root = settings.home / "broker"
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
