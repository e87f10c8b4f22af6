"""The fault-injection suite: crashes, outages and long bodies, with real workers and servers.

Every test runs real prefork workers against real PostgreSQL and Redis on
loopback, injects the fault for real (SIGKILL, a stopped server), and counts
business effects per message. Each has a plain-task control that shows the
fault doing damage, or the dedup tasks' numbers prove nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from django.db import connections

from dedup_celery.backends.base import Status
from dedup_celery.backends.redis import RedisBackend
from tests.scenario import effect_ns, effects, new_id, record, settle, starts, wait_until
from tests.services import RedisServer
from tests.testapp.tasks import (
    plain_effect,
    plain_store_effect,
    slow_heartbeat,
    slow_no_heartbeat,
    status_autoretry,
    status_effect,
    tx_autoretry,
    tx_effect,
)

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True, databases="__all__")]


def counts(tag, n_values):
    found = dict.fromkeys(n_values, 0)
    for n in effect_ns(tag):
        found[n] = found.get(n, 0) + 1
    return found


def publish(task, worker, task_id, connection=None, **kwargs):
    task.apply_async(kwargs=kwargs, task_id=task_id, queue=worker.queue, connection=connection)


def test_whole_worker_killed_with_tasks_in_flight_then_restarted(start_worker, report_scenario):
    """Fault 2: SIGKILL the main process and every child at once, then start the worker again."""
    # The visibility timeout is longer than the bodies, so only the kill makes the
    # broker deliver a message again (the control would otherwise run twice anyway).
    worker = start_worker("whole", broker_db=8, visibility_timeout=8)
    tag = f"whole-{new_id()[:8]}"
    plan = {  # n -> task; the plain and transactional bodies write before they sleep
        1: (plain_effect, {"effect_first": True}),
        2: (tx_effect, {"effect_first": True}),
        3: (status_effect, {}),
        4: (tx_effect, {"effect_first": True}),
    }
    from tests.celery_app import app

    url = worker.env["DEDUP_TEST_BROKER_URL"]
    with app.connection_for_write(url) as connection:
        for n, (task, options) in plan.items():
            publish(task, worker, new_id(), connection, tag=tag, n=n, sleep=4, **options)
    wait_until(lambda: len(starts(tag)) == 4, timeout=30, what="all four bodies to start")
    worker.kill()
    restarted = time.time()
    worker.start()
    wait_until(
        lambda: all(c >= 1 for c in counts(tag, plan).values()), timeout=60, what="every message"
    )
    settle(3)
    found = counts(tag, plan)
    # The control: its first run wrote the effect before the kill, and the restarted
    # worker ran it again.
    assert found[1] == 2, "the control was not run again: the kill did no harm"
    assert any(run.n == 1 and run.at > restarted for run in starts(tag))
    assert (found[2], found[3], found[4]) == (1, 1, 1)
    for mode, ns in (("plain", (1,)), ("transactional", (2, 4)), ("status", (3,))):
        report_scenario("worker killed", mode, tag, messages=len(ns), ns=ns)


@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
def test_postgres_stopped_during_a_stream_then_started(
    request, start_worker, database, report_scenario
):
    """Fault 3: no message lost, no duplicate effect, workers recover without a restart.

    With ``mariadb``, the message table and every body's effects are on the
    session's MariaDB, which is the server stopped.
    """
    if database == "mariadb":
        server = request.getfixturevalue("mariadb_server")
        worker = start_worker(
            "mariadb-outage",
            concurrency=2,
            dedup={"DATABASE": "mysql"},
            env={"DEDUP_TEST_EFFECT_DATABASE": "mysql"},
        )
        stop = server.stop
    else:
        server = request.getfixturevalue("postgres_server")
        worker = start_worker("pg-outage", concurrency=2)

        def stop():
            server.stop("fast")

    tag = f"{database}-{new_id()[:8]}"
    plan = {}
    for n in range(30):
        plan[n] = (tx_autoretry, status_autoretry, plain_effect)[n % 3]
    sent_at = {}
    for n, task in plan.items():
        if n == 9:
            stop()
            stopped = time.monotonic()
        if n == 21:
            time.sleep(max(0.0, 5 - (time.monotonic() - stopped)))
            server.start()
            restarted = time.monotonic()
        publish(task, worker, new_id(), tag=tag, n=n)
        sent_at[n] = time.monotonic()
        time.sleep(0.25)
    connections.close_all()
    dedup_ns = [n for n, task in plan.items() if task is not plain_effect]
    wait_until(
        lambda: all(c >= 1 for c in counts(tag, dedup_ns).values()),
        timeout=90,
        what="every dedup message to take effect",
    )
    done = time.monotonic()
    settle(3)
    found = counts(tag, plan)
    assert all(found[n] == 1 for n in dedup_ns), found
    plain_lost = [n for n, task in plan.items() if task is plain_effect and found[n] == 0]
    assert plain_lost, "no plain message was lost: the outage hit nothing"
    # The messages that failed and retried during the outage did not wait for the
    # lease (LEASE is minutes): they finished within seconds of the restart.
    assert done - restarted < 60
    assert "deadlock" not in worker.log_text().lower()
    for mode, task in (
        ("transactional", tx_autoretry),
        ("status", status_autoretry),
        ("plain", plain_effect),
    ):
        ns = [n for n, t in plan.items() if t is task]
        scenario = "PG stopped" if database == "postgresql" else "MariaDB stopped"
        report_scenario(scenario, mode, tag, messages=len(ns), ns=ns)


@pytest.fixture
def own_redis():
    server = RedisServer().start()
    yield server
    server.destroy()


def test_redis_store_stopped_during_a_stream_then_started(start_worker, own_redis, report_scenario):
    """Fault 4, store: claims fail while Redis is down; messages are rescheduled, not lost."""
    store_url = f"{own_redis.url}/0"
    worker = start_worker("redis-store-outage", concurrency=2, store_url=store_url)
    store = RedisBackend(url=store_url, key_prefix="scenario:")
    tag = f"store-{new_id()[:8]}"
    ids = {n: new_id() for n in range(20)}
    plain_tag = f"store-plain-{new_id()[:8]}"
    for n, task_id in ids.items():
        if n == 6:
            own_redis.stop()
            stopped = time.monotonic()
        if n == 14:
            time.sleep(max(0.0, 5 - (time.monotonic() - stopped)))
            own_redis.start()
        publish(status_effect, worker, task_id, tag=tag, n=n)
        # The control writes to the same Redis in its body, without dedup.
        publish(plain_store_effect, worker, new_id(), tag=plain_tag, n=n, store_url=store_url)
        time.sleep(0.25)
    wait_until(
        lambda: all(c == 1 for c in counts(tag, ids).values()),
        timeout=60,
        what="every message to take effect",
    )
    wait_until(
        lambda: len(starts(plain_tag)) == len(ids), timeout=60, what="every control message to run"
    )
    settle(3)
    assert all(c == 1 for c in counts(tag, ids).values())
    plain_lost = [n for n, c in counts(plain_tag, ids).items() if c == 0]
    assert plain_lost, "no control message was lost: the outage hit nothing"
    assert "the message store failed during claim" in worker.log_text()
    consumed = [record(status_effect, task_id, store) for task_id in ids.values()]
    # The messages sent before the stop or after the restart are CONSUMED; one whose
    # body finished just as Redis went away may stay PROCESSING (its complete could
    # not land, and the ERROR says so) until its lease ends.
    assert sum(r is not None and r.status == Status.CONSUMED for r in consumed) >= 14
    report_scenario(
        "Redis store stopped", "status-redis", tag, messages=len(ids), ns=ids, records=consumed
    )
    report_scenario("Redis store stopped", "plain", plain_tag, messages=len(ids), ns=ids)


def test_redis_broker_stopped_while_copies_wait_as_eta_tasks(
    start_worker, own_redis, report_scenario
):
    """Fault 4, broker: nothing is lost or applied twice across a broker outage.

    A copy of each message waits as an ETA task while the original runs, and
    the broker goes away meanwhile. The worker drops its connection, the broker
    restores the unacked originals and copies once it is back, and every copy
    meets the consumed record. (A reschedule whose publish fails is requeued,
    never dropped: tests/task/test_reschedule.py shows that path on its own.)
    Celery 5.7's worker may exit when the Redis broker disappears while it
    restores unacked messages (a kombu issue); a supervisor would start it
    again, and so does this test.
    """
    broker_url = f"{own_redis.url}/0"
    worker = start_worker("broker-outage", broker_url=broker_url, visibility_timeout=4)
    tag = f"broker-{new_id()[:8]}"
    from tests.celery_app import app

    ids = {n: new_id() for n in range(3)}
    plan = {0: tx_effect, 1: tx_effect, 2: plain_effect}  # n=2 is the plain control
    with app.connection_for_write(broker_url) as connection:
        for n, task in plan.items():
            # The control is shorter than the visibility timeout, so only the
            # outage (its ack cannot reach the broker) makes it run again.
            sleep = 2 if task is plain_effect else 6
            publish(task, worker, ids[n], connection, tag=tag, n=n, sleep=sleep)
        for n in (0, 1):  # the copies that come due during the outage
            tx_effect.apply_async(
                kwargs={"tag": tag, "n": n, "sleep": 6},
                task_id=ids[n],
                queue=worker.queue,
                connection=connection,
                countdown=2,
            )
    wait_until(lambda: len(starts(tag)) == 3, timeout=30, what="the three bodies to start")
    own_redis.stop()
    time.sleep(6)
    log_before = len(worker.log_text())
    back = time.time()
    own_redis.start()

    def reconnected_or_exited():
        return worker.process.poll() is not None or "Connected to" in worker.log_text()[log_before:]

    wait_until(reconnected_or_exited, timeout=30, what="the worker to reconnect or exit")
    if worker.process.poll() is not None:
        worker.stop()
        worker.start()

    def all_copies_handled():
        found = [record(tx_effect, ids[n]) for n in (0, 1)]
        return all(r is not None and r.skipped >= 1 for r in found)

    wait_until(all_copies_handled, timeout=90, what="every copy to be skipped after the outage")
    wait_until(lambda: counts(tag, [2])[2] >= 2, timeout=60, what="the control to run again")
    settle(3)
    found = counts(tag, plan)
    assert (found[0], found[1]) == (1, 1)
    # The control, sent once with no copy: it finished while the broker was down,
    # could not be acked, and the broker delivered it again once it was back.
    assert any(run.n == 2 and run.at > back for run in starts(tag))
    records = [record(tx_effect, ids[n]) for n in (0, 1)]
    report_scenario(
        "Redis broker stopped", "transactional", tag, messages=4, ns=(0, 1), records=records
    )
    report_scenario("Redis broker stopped", "plain", tag, messages=1, ns=(2,))


def test_a_body_longer_than_its_lease_keeps_its_claim_with_a_heartbeat(
    start_worker, report_scenario
):
    """Fault 5: with a heartbeat a copy stays rescheduled; without one it takes over."""
    worker = start_worker("heartbeat", concurrency=2)
    for task, expected in ((slow_heartbeat, 1), (slow_no_heartbeat, 2)):
        tag, task_id = f"hb-{new_id()[:8]}", new_id()
        publish(task, worker, task_id, tag=tag, n=1, sleep=6)
        wait_until(lambda tag=tag: len(starts(tag)) == 1, what="the body to start")
        time.sleep(1)
        publish(task, worker, task_id, tag=tag, n=1, sleep=6)  # a copy, in flight meanwhile
        wait_until(
            lambda tag=tag, task_id=task_id, task=task, expected=expected: (
                (found := record(task, task_id)) is not None
                and found.status == Status.CONSUMED
                and effects(tag) >= expected
            ),
            timeout=40,
            what="the message to finish",
        )
        settle(3)
        assert effects(tag) == expected
        found = record(task, task_id)
        if task is slow_heartbeat:
            assert (found.takeovers, found.heartbeat_at is not None) == (0, True)
        else:
            assert found.takeovers == 1
            assert f"[{task_id}]: lease lost" in worker.log_text()
        report_scenario(
            "body > lease",
            "heartbeat" if expected == 1 else "no heartbeat",
            tag,
            messages=2,
            records=[found],
        )


@pytest.fixture(scope="module")
def poison_worker(start_worker):
    return start_worker("poison", concurrency=2, dedup={"MAX_TAKEOVERS": 2})


@contextlib.contextmanager
def purging():
    """Purge the message table over and over, as a beat task would, while the block runs."""
    from dedup_celery.backends.db import DatabaseBackend

    stop = threading.Event()

    def purge():
        backend = DatabaseBackend()
        try:
            while not stop.wait(0.05):
                backend.purge_expired()
        finally:
            connections.close_all()

    thread = threading.Thread(target=purge, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.parametrize("purge", [False, True], ids=["", "purged-between"])
def test_a_poison_message_stops_at_max_takeovers(poison_worker, purge, report_scenario):
    """Fault 8: a body that always kills its process stops after MAX_TAKEOVERS.

    With a purge running between the crashes, the count survives too: the
    record of an unfinished message is kept RECORD_TTL past its lease.
    """
    worker = poison_worker
    tag, task_id = f"poison-{new_id()[:8]}", new_id()

    def poisoned():
        found = record(status_effect, task_id)
        return found is not None and found.status == Status.POISONED

    with purging() if purge else contextlib.nullcontext():
        publish(status_effect, worker, task_id, tag=tag, n=1, kill="always")
        wait_until(poisoned, timeout=60, what="the record to be poisoned")
    wait_until(lambda: "PoisonMessageError" in worker.log_text(), what="the failure")
    settle(4)
    assert len(starts(tag)) == 3  # the first run and two takeovers, then no more
    assert "POISON MESSAGE" in worker.log_text()

    control_tag = f"poison-plain-{new_id()[:8]}"
    publish(plain_effect, worker, new_id(), tag=control_tag, n=1, kill="always")
    wait_until(
        lambda: len(starts(control_tag)) >= 6, timeout=60, what="the control to keep crashing"
    )
    scenario = "poison, purged between" if purge else "poison"
    report_scenario(
        scenario, "status", tag, messages=1, records=[record(status_effect, task_id)],
        effect_expected=False,
    )  # fmt: skip
    report_scenario(scenario, "plain", control_tag, messages=1, effect_expected=False)
