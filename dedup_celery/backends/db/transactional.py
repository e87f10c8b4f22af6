"""The transactional claim: one ``transaction.atomic`` around the claim, the body and COMMIT."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from django.db import connections, transaction

from dedup_celery.backends.base import Claim, TransactionalClaim
from dedup_celery.backends.db.connection import DRIVER_ERRORS, storage_error, transaction_broken
from dedup_celery.exceptions import DedupError, OuterTransactionError, StorageError

if TYPE_CHECKING:
    from dedup_celery.backends.db import DatabaseBackend


@contextmanager
def transactional_block(backend: DatabaseBackend, claim: Claim) -> Iterator[TransactionalClaim]:
    """Open the transaction, claim in it, yield to the body, store the result, COMMIT.

    Every failure of the store (opening, the claim, storing the result, the
    rollback, COMMIT) leaves as a StorageError whose ``step`` says which; what
    the body raises leaves unchanged, after the rollback.
    """
    alias, table = backend.alias, backend.table
    connection = connections[alias]
    if connection.in_atomic_block:
        raise OuterTransactionError(
            f"Task {claim.task_name!r} is transactional but was called inside an open "
            f"transaction on the {backend.describe()} (ATOMIC_REQUESTS, an eager call or "
            "apply() inside transaction.atomic). Its record would only be a savepoint. "
            "Send it with delay_on_commit(), or call it outside the atomic block."
        )
    atomic = transaction.atomic(using=alias)
    step = "claim"
    try:
        atomic.__enter__()
    except DRIVER_ERRORS as exc:
        raise storage_error(alias, table, exc, step) from exc
    try:
        try:
            handle = TransactionalClaim(backend.claim_in_transaction(claim))
        except DRIVER_ERRORS as exc:
            raise storage_error(alias, table, exc, step) from exc
        yield handle
        if handle.outcome.verdict.claimed:
            if transaction_broken(connection):
                raise DedupError(
                    f"{claim.task_name}[{claim.task_id}]: the body caught a database error "
                    "and returned normally, which left its transaction marked for "
                    "rollback; nothing was committed. Let the error propagate, or "
                    "wrap the failing statement in its own transaction.atomic()."
                )
            if connection.vendor == "mysql" and not backend.still_holds(claim):
                error = StorageError(
                    f"{claim.task_name}[{claim.task_id}]: the claim's record was gone before "
                    "COMMIT: InnoDB rolled back the whole transaction (a deadlock or lock "
                    "wait timeout that the body caught), and what the body did after it ran "
                    "in a new one. Nothing was committed."
                )
                error.step = "commit"
                raise error
            if handle.result is not None:
                step = "store"
                try:
                    backend.store_result(claim, handle.result)
                except DRIVER_ERRORS as exc:
                    raise storage_error(alias, table, exc, step) from exc
    except BaseException:
        try:
            atomic.__exit__(*sys.exc_info())
        except DRIVER_ERRORS as exc:
            # The rollback failed too (the connection is gone): still a store failure.
            raise storage_error(alias, table, exc, "rollback") from exc
        raise
    try:
        atomic.__exit__(None, None, None)
    except DRIVER_ERRORS as exc:
        raise storage_error(alias, table, exc, "commit") from exc
