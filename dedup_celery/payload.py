"""The payload fingerprint: the sha256 of a message's arguments, in one canonical form.

Every claim stores it in ``payload_digest``, so that a duplicate whose
arguments differ from the original's can be told apart
(:mod:`dedup_celery.delivery.mismatch`). It is computed in the worker, from
the decoded arguments (a producer's tuples and datetimes are not what the
worker sees), as kombu's JSON with sorted keys and no spaces, so equal
arguments give one digest whatever their key order. A task's ``dedup_payload``
callable picks what counts instead; a task serialized with anything but JSON
and without that callable gets none. ``benchmarks/fingerprint.py`` measures it.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

from kombu.utils import json as kombu_json

from dedup_celery.exceptions import DedupPayloadError

# One encoder for the process: building one per call costs as much as encoding a
# small message. JSONEncoder keeps no state between calls, so threads can share it.
_ENCODER = kombu_json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(value: Any) -> bytes:
    """*value* as kombu's JSON with sorted keys, compact, as UTF-8 (lone surrogates kept).

    Tuples and lists are the same JSON array, as they are once a message is
    decoded. Raises ``TypeError`` or ``ValueError`` for what JSON cannot hold.
    """
    return _ENCODER.encode(value).encode("utf-8", "surrogatepass")


def fingerprint(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> str | None:
    """The sha256 hex digest of ``[args, kwargs]`` in canonical form, or None.

    None when the arguments are not JSON (a message of another serializer
    decodes to objects JSON cannot hold): no fingerprint, so never a mismatch.
    """
    try:
        data = canonical([list(args), kwargs])
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(data).hexdigest()


# type(task) -> the signature of its body, bound to once per delivery.
_SIGNATURES: dict[type, inspect.Signature | None] = {}


def call_fingerprint(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The fingerprint of a call of *task*'s body: its arguments bound to their parameters.

    ``charge(42)``, ``charge(order=42)`` and ``charge(42, qty=None)`` (when
    ``qty`` defaults to None) are one call, so they have one digest: the
    sha256 of the parameters' values by name, defaults applied. Arguments that
    do not fit the body's signature (the body will raise) are fingerprinted as
    they are (:func:`fingerprint`).
    """
    kind = type(task)
    try:
        signature = _SIGNATURES[kind]
    except KeyError:
        try:
            signature = inspect.signature(task.run)
        except (TypeError, ValueError):
            signature = None
        _SIGNATURES[kind] = signature
    if signature is None:
        return fingerprint(args, kwargs)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return fingerprint(args, kwargs)
    bound.apply_defaults()
    try:
        data = canonical(bound.arguments)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(data).hexdigest()


def message_fingerprint(
    task: Any, payload_function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    """The fingerprint of one delivery's arguments, or None when it has none.

    With a ``dedup_payload`` callable (*payload_function*), the digest of what
    it returns for the arguments (None: no fingerprint for this call), whatever
    the serializer; it raises :class:`~dedup_celery.exceptions.DedupPayloadError`
    when the callable raises or returns what JSON cannot hold. Without one, the
    digest of the call (:func:`call_fingerprint`), only for a task serialized
    as JSON: another serializer's arguments decode to objects that JSON would
    render differently from their message.
    """
    if payload_function is None:
        serializer = getattr(task, "serializer", None) or task.app.conf.task_serializer
        return call_fingerprint(task, args, kwargs) if serializer == "json" else None
    try:
        value = payload_function(*args, **kwargs)
    except Exception as exc:
        raise DedupPayloadError(
            f"dedup_payload of task {task.name!r} raised {type(exc).__name__}: {exc}; "
            "fix the callable or the arguments."
        ) from exc
    if value is None:
        return None
    try:
        data = canonical(value)
    except (TypeError, ValueError) as exc:
        raise DedupPayloadError(
            f"dedup_payload of task {task.name!r} returned a {type(value).__name__} that "
            f"JSON cannot hold ({exc}); return JSON-able values (str, numbers, lists, dicts) "
            "or None."
        ) from exc
    return hashlib.sha256(data).hexdigest()
