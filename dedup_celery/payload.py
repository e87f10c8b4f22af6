"""The payload fingerprint: the sha256 of a message's arguments, in one canonical form.

Issue 13's groundwork: a claim will store it in ``payload_digest`` so that a
duplicate whose arguments differ from the original's can be told apart. It
is computed in the worker, from the decoded arguments (a producer's tuples
and datetimes are not what the worker sees), as kombu's JSON with sorted keys
and no spaces, so equal arguments give one digest whatever their key order.

Not yet called by a delivery: the claim, the mismatch check and the
``dedup_payload`` task option come next, on top of this.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kombu.utils import json as kombu_json


def canonical(value: Any) -> bytes:
    """*value* as kombu's JSON with sorted keys, compact, as UTF-8 (lone surrogates kept).

    Tuples and lists are the same JSON array, as they are once a message is
    decoded. Raises ``TypeError`` or ``ValueError`` for what JSON cannot hold.
    """
    text = kombu_json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


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
