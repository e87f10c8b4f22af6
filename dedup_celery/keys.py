"""How message keys become record identities."""

from __future__ import annotations

import hashlib


def digest(text: str) -> str:
    """Return the sha256 hex digest of the exact UTF-8 bytes of *text*.

    Keys that differ only by case, trailing space, NUL or length get different
    digests, on every database. Lone surrogates are kept (``surrogatepass``)
    rather than refused, so any ``str`` is a usable key.
    """
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def display_key(key: str, limit: int = 255) -> str:
    """Return *key* fit for display: control characters escaped, truncated to *limit*.

    The exact key is only ever compared through its digest, so this text is for
    people: PostgreSQL cannot store NUL, and a 10 kB key is unreadable anyway.
    """
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in key)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text
