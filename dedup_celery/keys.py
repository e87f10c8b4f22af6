"""How tasks and messages become record identities: the scope, the key and its digest."""

from __future__ import annotations

import hashlib
from typing import Any

from dedup_celery.exceptions import DedupKeyError


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
    if len(key) <= limit and key.isprintable():
        return key  # the common case (a task id, a business key), without a copy
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in key)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def storable(text: str, limit: int = 255) -> str:
    """Return *text* as every store can keep it in a column of *limit* characters.

    Text that fits, holds no NUL and is valid UTF-8 comes back unchanged (so
    every id that stores today keeps its stored form). Other text becomes its
    display form cut short, then ``#`` and its digest: still readable, still one
    stored value per text. Task ids and host names, which the store compares
    for equality, are written in this form.
    """
    if len(text) <= limit and "\x00" not in text:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return text
    return f"{display_key(text, limit - 65)}#{digest(text)}"


def scope_for(task: Any) -> str:
    """Return the scope of *task*'s records: its ``dedup_scope``, or else its name."""
    scope: str = task.dedup_scope or task.name
    return scope


def nested_key(key: str, nesting: int) -> str:
    """Return *key* for a message at ``replaced_task_nesting`` *nesting*: ``<key>#r<n>`` past 0.

    ``Task.replace()`` gives the replacement the replaced task's id, and Celery
    copies the nesting onto the replacement's redeliveries and onto the chain
    members after it (with their own ids). So the nesting is part of the
    message's identity: a replacement is a new message, and a redelivery of it
    is a copy of that one.
    """
    return f"{key}#r{int(nesting)}" if nesting else key


def message_key(
    task: Any, key_function: Any, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    """Return the key of *request*'s message: its task id, or ``key_function(*args, **kwargs)``.

    *request* is the task's request (``task.request``) or the worker's
    ``Request``: both carry ``id`` and ``replaced_task_nesting``. A message at
    nesting n > 0 gets ``#r<n>`` after it (:func:`nested_key`). None means "run
    this call without dedup". Anything else that is not a non-empty str raises
    :class:`DedupKeyError` naming the task and the cause. The task and the
    worker's request derive keys here, the commands through :func:`nested_key`.
    """
    nesting = getattr(request, "replaced_task_nesting", 0) or 0
    if key_function is None:
        return nested_key(request.id, nesting)
    try:
        key = key_function(*args, **kwargs)
    except Exception as exc:
        raise DedupKeyError(
            f"dedup_key of task {task.name!r} raised {type(exc).__name__}: {exc}. "
            "The task did not run; fix the callable or the arguments."
        ) from exc
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        what = f"a {type(key).__name__}" if not isinstance(key, str) else "an empty string"
        raise DedupKeyError(
            f"dedup_key of task {task.name!r} returned {what}; it must return a non-empty str "
            "(or None to skip dedup for this call). The task did not run."
        )
    return nested_key(key, nesting)
