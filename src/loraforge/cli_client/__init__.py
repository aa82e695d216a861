"""The client half of the ``loraforge`` CLI: ``files``, ``jobs``, ``models``, ``batches`` and ``chat``
over HTTP.

The HTTP client is the ``openai`` SDK itself, configured like the SDK: ``LORAFORGE_BASE_URL`` /
``LORAFORGE_API_KEY``, or ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``. The SDK is imported only when
a client command runs, so ``loraforge serve|api|worker|engine`` do not pay for it.
"""

from __future__ import annotations

import typer

from loraforge.cli_client.batches import batches_app
from loraforge.cli_client.chat import chat
from loraforge.cli_client.files import files_app
from loraforge.cli_client.jobs import jobs_app
from loraforge.cli_client.models import models_app


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``loraforge`` app.

    Args:
        app: the top-level typer app of ``loraforge``.
    """
    app.add_typer(files_app, name="files")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(models_app, name="models")
    app.add_typer(batches_app, name="batches")
    app.command("chat")(chat)
