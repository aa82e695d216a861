"""Signing secrets and Standard Webhooks signatures.

Signatures come from the maintained ``standardwebhooks`` package. It is compatible with the
``openai`` SDK's verifier for the secrets we issue: both strip ``whsec_`` and base64-decode the
rest into the HMAC key, and both sign ``f"{webhook_id}.{timestamp}.{body}"`` with HMAC-SHA256
(OPENAI_CONTRACT.md §7.2; a unit test verifies our headers with ``openai``'s own
``webhooks.unwrap``). The two differ only for secrets *without* the prefix, which we never issue.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"
# 32 random bytes, the key size Standard Webhooks recommends for HMAC-SHA256.
_KEY_BYTES = 32


def new_secret() -> str:
    """A fresh signing secret, ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode()


def secret_hint(secret: str) -> str:
    """A masked form of ``secret`` that is safe to show again (``whsec_****abcd``)."""
    return f"{SECRET_PREFIX}****{secret[-4:]}"


def signed_headers(webhook_id: str, timestamp: int, body: str, signing_secrets: list[str]) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt.

    Args:
        webhook_id: the delivery id; the same on every retry so receivers can deduplicate.
        timestamp: Unix seconds of this attempt (receivers reject ones older than 5 minutes).
        body: the exact JSON text that is sent.
        signing_secrets: the current secret first; during a rotation grace period also the old
            one, so receivers still holding it keep verifying (space-separated ``v1,`` entries).

    Returns:
        ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``.
    """
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    signatures = [Webhook(secret).sign(webhook_id, moment, body) for secret in signing_secrets]
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }
