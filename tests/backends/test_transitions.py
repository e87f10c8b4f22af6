"""A Hypothesis stateful test of the transition table, on every backend variant.

Random interleavings of claim, complete, fail, release, expire, renew and purge,
by several deliveries (each claim is a new delivery with its own owner token, in
one of a few slots) and task ids, with a clock that moves: short leases
that run out while the test waits, beside long ones. After every step:

* at most one live owner: a claim is granted to a new owner only once the
  previous holder's lease has ended by the store's own clock, or the holder let go;
* no consumed record is lost: once an owner's complete succeeded, the record
  stays CONSUMED and every other claim meets it, through purges and releases;
* the duplicate counters never go down while the record exists.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from dedup_celery.backends.base import Status, Verdict
from tests.helpers import ELSEWHERE, make_claim

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "sqlite", "mysql"])

OWNERS = 3
TASK_IDS = ("tid-a", "tid-b")
SHORT, LONG = 0.03, 600.0  # seconds of lease: one runs out while the test waits


@dataclass
class Holder:
    owner: str
    expires_at: object  # the store's datetime
    ended: bool = False


class Transitions(RuleBasedStateMachine):
    """The message table's transitions on one record, judged by the store's answers."""

    backend = None  # set per run

    def __init__(self) -> None:
        super().__init__()
        self.key = f"hyp-{uuid.uuid4().hex}"
        self.claims: dict[int, object] = {}
        self.holder: Holder | None = None
        self.consumed = False
        self.counters: dict[str, int] | None = None

    def _claim_of(self, who):
        return self.claims.get(who)

    def _record(self):
        claim = make_claim(self.key)
        return self.backend.get(claim.scope, claim.key_digest)

    @rule(
        who=st.integers(0, OWNERS - 1),
        task=st.sampled_from(TASK_IDS),
        attempt=st.integers(0, 2),
        lease=st.sampled_from([SHORT, LONG]),
    )
    def claim(self, who, task, attempt, lease):
        # A new delivery in slot *who*: every delivery has an owner token of its own.
        claim = make_claim(
            self.key, owner=uuid.uuid4().hex, task_id=task, attempt=attempt, lease=lease,
            ttl=3600, cap=3, identity=ELSEWHERE,
        )  # fmt: skip
        outcome = self.backend.claim(claim)
        if not outcome.verdict.claimed:
            if self.consumed:
                assert outcome.verdict in (Verdict.CONSUMED, Verdict.STALE), outcome.verdict
            return
        record = outcome.record
        assert not self.consumed, "a consumed record was claimed"
        held = self.holder
        if held is not None and not held.ended and held.owner != claim.owner:
            # The store granted it at record.updated_at by its own clock.
            assert held.expires_at <= record.updated_at, "two live owners"
        self.claims[who] = claim
        self.holder = Holder(claim.owner, record.expires_at)

    @rule(who=st.integers(0, OWNERS - 1))
    def complete(self, who):
        claim = self._claim_of(who)
        if claim is None or self.consumed:
            return
        held = self.holder
        current = held is not None and held.owner == claim.owner and not held.ended
        if self.backend.complete(claim, None) and current:
            self.consumed = True
            held.ended = True

    @rule(who=st.integers(0, OWNERS - 1))
    def fail(self, who):
        claim = self._claim_of(who)
        if claim is not None and self.backend.fail(claim):
            self._let_go(claim.owner)

    @rule(who=st.integers(0, OWNERS - 1), expired_only=st.booleans())
    def release(self, who, expired_only):
        claim = self._claim_of(who)
        if claim is not None and self.backend.release(
            claim.scope, claim.key_digest, claim.owner, expired_only=expired_only
        ):
            self._let_go(claim.owner)
            self.counters = None  # the record is gone

    @rule(who=st.integers(0, OWNERS - 1))
    def expire(self, who):
        claim = self._claim_of(who)
        if claim is not None and self.backend.expire_lease(
            claim.scope, claim.key_digest, claim.owner
        ):
            self._let_go(claim.owner)

    @rule(who=st.integers(0, OWNERS - 1))
    def renew(self, who):
        claim = self._claim_of(who)
        if claim is None or not self.backend.renew(claim):
            return
        held = self.holder
        if held is not None and held.owner == claim.owner:
            held.expires_at = self._record().expires_at

    @rule()
    def purge(self):
        self.backend.purge_expired()

    @rule()
    def wait(self):
        time.sleep(SHORT * 1.5)

    def _let_go(self, owner):
        if self.holder is not None and self.holder.owner == owner:
            self.holder.ended = True

    @invariant()
    def consumed_records_stay_and_counters_never_go_down(self):
        record = self._record()
        if self.consumed:
            assert record is not None, "a consumed record was lost"
            assert record.status == Status.CONSUMED
        if record is None:
            self.counters = None
            return
        now = {"skipped": record.skipped, "rescheduled": record.rescheduled}
        if self.counters is not None:
            for name, value in now.items():
                assert value >= self.counters[name], f"{name} went down"
        self.counters = now


def test_random_interleavings_keep_one_owner_and_every_consumed_record(backend):
    Transitions.backend = backend
    run_state_machine_as_test(
        Transitions,
        settings=settings(
            max_examples=30,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
