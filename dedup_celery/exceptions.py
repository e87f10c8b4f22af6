"""Exceptions raised by dedup_celery."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


class DedupError(Exception):
    """Root of every runtime error raised by dedup_celery."""


class DedupKeyError(DedupError):
    """A task's ``dedup_key`` callable raised or returned an unusable key."""


class DedupPayloadError(DedupKeyError):
    """A task's ``dedup_payload`` callable raised or returned what JSON cannot hold.

    A delivery logs it as a WARNING and goes on without a payload fingerprint,
    so a broken callable never changes what happens to the message.
    """


class PayloadMismatchError(DedupError):
    """A duplicate's arguments differ from those of the message that holds its key.

    Raised for a duplicate under its own task id when ``PAYLOAD_MISMATCH`` (or
    the task's ``dedup_payload_mismatch``) is ``"raise"``: the duplicate fails
    instead of answering with the original's result. A copy under the original's
    own task id is ignored instead, so the original's state stays as it is.
    """


class DuplicateInFlightError(DedupError):
    """An eager call met a copy of the same message that is still running.

    A worker reschedules such a duplicate; an eager call cannot, because the
    reschedule would run at once, inside the current call, and recurse.
    """


class OuterTransactionError(DedupError):
    """A transactional task was called inside an outer ``transaction.atomic`` block.

    The record would only be a savepoint of the caller's transaction, so the
    guarantee would depend on a commit this library does not control.
    """


class PoisonMessageError(DedupError):
    """The message's deliveries kept dying in the body; it will not run again by itself.

    Raised by every delivery that meets a POISONED record, so each one shows up
    as a failure. An operator releases the record (admin action or
    ``dedup_release``) once the cause is fixed.
    """


class StorageError(DedupError):
    """The message store could not be reached or refused a statement.

    ``step`` names what failed when the store knows (``"claim"``, ``"store"``,
    ``"commit"``), else it is empty.
    """

    step: str = ""


class StorageRefusedError(StorageError):
    """The store refused a statement for its values (a ``DataError`` or ``IntegrityError``).

    Retrying cannot fix that, so it is never taken for an outage: the delivery
    fails at once, with the store's own message, instead of being rescheduled.
    """


class MissingTableError(StorageError):
    """The message table does not exist: the migrations were not run on that database."""


class DedupConfigurationError(ImproperlyConfigured):
    """``settings.DEDUP_CELERY`` or a task's dedup options cannot work.

    *setting* names the ``DEDUP_CELERY`` key at fault when one is (``"BACKEND"``,
    ``"OPTIONS"``, ``"DATABASE"``), so a check's hint can say what to change.
    """

    def __init__(self, *args: object, setting: str | None = None) -> None:
        super().__init__(*args)
        self.setting = setting
