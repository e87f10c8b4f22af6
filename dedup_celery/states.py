"""The states of a message record: one vocabulary for the SQL, the Lua, the admin, the commands."""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _


class Status(models.TextChoices):
    """The state of a message record."""

    PROCESSING = "processing", _("processing")
    CONSUMED = "consumed", _("consumed")
    #: The body raised (it failed for good, or asked for a retry). Copies of the
    #: same task id with the same or a lower attempt are stale and are skipped.
    FAILED = "failed", _("failed")
    #: Deliveries kept dying while they held the record (MAX_TAKEOVERS reached).
    POISONED = "poisoned", _("poisoned")
    #: A producer published the message (``dedup_on_enqueue = "queued"``) and no
    #: delivery has claimed it yet: only a delivery of that task id claims it
    #: before ``expires_at`` (the queue TTL); other copies are rescheduled.
    QUEUED = "queued", _("queued")


#: The states an operator may release (delete so the message can run again).
#: A PROCESSING record goes only with an expired lease, unless the release is forced.
RELEASABLE: tuple[Status, ...] = (Status.PROCESSING, Status.POISONED, Status.QUEUED)


#: The states an operator may forget (delete so a finished message can run again).
FORGETTABLE: tuple[Status, ...] = (Status.CONSUMED, Status.FAILED)


def may_release(status: str, *, lease_expired: bool | None, force: bool) -> bool:
    """Whether an operator's release of a record in *status* is allowed.

    The database statement (``backends/db/sql.py``) and the Redis script
    (``lua/release.lua``) apply the same rule atomically, and the backend
    contract tests hold both to it; ``dedup_release`` uses this to explain a
    refusal.
    """
    if status in (Status.POISONED, Status.QUEUED):
        return True
    return status == Status.PROCESSING and (force or bool(lease_expired))


def retention(lease_seconds: float, record_ttl: float) -> float:
    """Seconds from a claim until a purge may delete its record: the lease, then RECORD_TTL.

    A PROCESSING record whose lease ran out still holds the message's
    takeovers count, which a later delivery needs to stop a poison message.
    """
    return float(lease_seconds) + float(record_ttl)
