"""Transactional mode: the claim, the body and its stored result commit together, or not at all."""

from __future__ import annotations

from typing import Any

from celery.exceptions import Ignore

from dedup_celery.backends.base import TransactionalBackend
from dedup_celery.delivery import outcomes
from dedup_celery.delivery.base import Delivery
from dedup_celery.delivery.results import storable_result
from dedup_celery.exceptions import StorageError


class TransactionalDelivery(Delivery):
    """One transactional delivery: one ``backend.transactional_claim()`` block around the body."""

    def run(self) -> Any:
        """Claim and run the body in one transaction; reschedule if the store fails."""
        backend = self.backend
        assert isinstance(backend, TransactionalBackend), "deliver() checks the backend"
        ignored: Ignore | None = None
        retval: Any = None
        body_raised = False
        try:
            with backend.transactional_claim(self.claim) as txn:
                if txn.outcome.verdict.claimed:
                    self.claimed(txn.outcome)
                    try:
                        retval = self.run_body()
                    except Ignore as exc:
                        # The message is handled: commit, then let Celery see the Ignore.
                        ignored = exc
                    except BaseException:
                        body_raised = True
                        raise
                    txn.result = storable_result(self, retval)
        except StorageError as exc:
            if body_raised:
                raise
            # Nothing is lost by rescheduling: if the COMMIT did land, the next
            # delivery is a duplicate and is skipped.
            outcomes.storage_unavailable(self, exc, exc.step or "claim")
        if not txn.outcome.verdict.claimed:
            return outcomes.duplicate(self, txn.outcome)
        if ignored is not None:
            raise ignored
        return retval
