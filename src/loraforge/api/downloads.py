"""``Content-Disposition`` for downloads, per RFC 6266 with RFC 5987/8187 for non-ASCII names.

A file name comes from whoever uploaded it. Put into a header as it is, a non-ASCII name is not
Latin-1 and fails the response (a 500 and a dropped connection), and a name with quotes or ``;``
adds parameters of its own (``filename*=…evil.sh``). The header built here has a quoted ASCII
fallback with every character that could end the string or start a parameter replaced, and the
exact name percent-encoded in ``filename*``, which every current browser and HTTP client prefers.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

# RFC 5987 attr-char beside letters and digits: what percent-encoding may leave as it is.
_ATTR_CHARS = "!#$&+-.^_`|~"
# What the quoted fallback keeps; everything else (quotes, backslashes, ';', '/', controls) is '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._()+-]")


def _printable(name: str) -> str:
    return "".join(ch for ch in name if ch.isprintable())


def ascii_fallback(name: str) -> str:
    """A plain-ASCII stand-in for ``name`` (accents dropped, the rest ``_``), never empty."""
    folded = unicodedata.normalize("NFKD", _printable(name)).encode("ascii", "ignore").decode("ascii")
    safe = _UNSAFE.sub("_", folded).strip()
    stem, dot, ext = safe.rpartition(".")
    if dot and ext and not stem.strip("_ ."):  # nothing ASCII was left of the name itself
        return f"file.{ext}"
    return safe if safe.strip("_ .") else "file"


def content_disposition(name: str) -> str:
    """``attachment; filename="ascii"; filename*=UTF-8''percent-encoded`` for ``name``.

    Args:
        name: the download's file name, as its owner chose it.

    Returns:
        A header value that is ASCII, names exactly one file, and keeps the full name.
    """
    exact = quote(_printable(name) or "file", safe=_ATTR_CHARS)
    return f"attachment; filename=\"{ascii_fallback(name)}\"; filename*=UTF-8''{exact}"


__all__ = ["ascii_fallback", "content_disposition"]
