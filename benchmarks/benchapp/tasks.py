"""The benchmark's tasks: two bodies, each as plain Celery, DedupTask in each mode, and the peers.

Every task takes ``(variant, run, n)`` and writes one Row stamped with the
database's clock; the realistic body first reads three catalogue items by their
unique key. The plain tasks have the delivery settings DedupTask turns on
(``acks_late``, ``reject_on_worker_lost``, ``ignore_result``), so a ratio
measures dedup, not ``acks_late``.
"""

import functools
import os
import uuid

from celery import shared_task
from django.db import connection, transaction
from django.db.models.functions import Now

from benchmarks.benchapp.models import Item, Row
from dedup_celery import DedupTask

#: Items in the catalogue the realistic body reads (bench.py fills it).
CATALOGUE = 10_000

PLAIN = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


def one_row(variant, run, n):
    """The one-row body: a single INSERT."""
    Row.objects.create(variant=variant, run=run, n=n, at=Now())


def realistic(variant, run, n):
    """Three indexed reads and one INSERT."""
    for k in range(3):
        Item.objects.filter(sku=f"sku-{(n * 3 + k) % CATALOGUE}").values_list("stock").first()
    Row.objects.create(variant=variant, run=run, n=n, at=Now())


BODIES = {"row": one_row, "read": realistic}

FLOOR_CLAIM = "INSERT INTO benchapp_floorclaim (k, status) VALUES (%s, 'p') ON CONFLICT DO NOTHING"
FLOOR_COMPLETE = "UPDATE benchapp_floorclaim SET status = 'c' WHERE k = %s"


@functools.cache
def floor_redis_client():
    """The Redis client of the floor_redis variant (the broker's server, a db of its own)."""
    import redis

    return redis.Redis.from_url(os.environ["DEDUP_BENCH_BROKER_URL"][:-1] + "6")


def _make(body_name, body):
    made = {}

    def task(**options):
        def decorate(func):
            name = f"benchmarks.benchapp.tasks.{body_name}_{func.__name__}"
            return shared_task(name=name, **options)(func)

        return decorate

    @task(**PLAIN)
    def plain(variant, run, n):
        body(variant, run, n)

    @task(**PLAIN)
    def plain_atomic(variant, run, n):
        with transaction.atomic():
            body(variant, run, n)

    @task(base=DedupTask, ignore_result=True)
    def status(variant, run, n):
        body(variant, run, n)

    @task(base=DedupTask, ignore_result=True, dedup_transactional=True)
    def transactional(variant, run, n):
        body(variant, run, n)

    # The floor: the plain task plus the least each mode must add, as raw statements
    # on a minimal table: a durable claim before the body and a durable mark after it;
    # one insert inside the body's transaction; SET NX and SET on Redis.
    @task(**PLAIN)
    def floor_status(variant, run, n):
        key = uuid.uuid4().hex
        with connection.cursor() as cursor:
            cursor.execute(FLOOR_CLAIM, [key])
        body(variant, run, n)
        with connection.cursor() as cursor:
            cursor.execute(FLOOR_COMPLETE, [key])

    @task(**PLAIN)
    def floor_transactional(variant, run, n):
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(FLOOR_CLAIM, [uuid.uuid4().hex])
            body(variant, run, n)

    @task(**PLAIN)
    def floor_redis(variant, run, n):
        key = uuid.uuid4().hex
        store = floor_redis_client()
        store.set(key, "p", nx=True, px=3_600_000)
        body(variant, run, n)
        store.set(key, "c", px=3_600_000)

    made.update(
        plain=plain,
        plain_atomic=plain_atomic,
        status=status,
        transactional=transactional,
        floor_status=floor_status,
        floor_transactional=floor_transactional,
        floor_redis=floor_redis,
    )
    made["redis"] = status  # the same task, on a worker whose store is Redis
    return made


TASKS = {name: _make(name, body) for name, body in BODIES.items()}


# The peers, with the one-row body. Each stores less than dedup_celery does; see
# docs/BENCHMARKS.md for what each guarantees.
@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=False)
def peer_celery_dedup(variant, run, n):
    """Celery's worker_deduplicate_successful_tasks: needs the result stored (SUCCESS)."""
    one_row(variant, run, n)


def _peer_tasks():
    peers = {"celery_dedup": peer_celery_dedup}
    try:
        from celery_once import QueueOnce
    except ImportError:  # make bench installs it; the tests do not need it
        QueueOnce = None
    if QueueOnce is not None:

        @shared_task(base=QueueOnce, once={"graceful": True}, **PLAIN)
        def peer_celery_once(variant, run, n):
            one_row(variant, run, n)

        peers["celery_once"] = peer_celery_once
    try:
        from celery_singleton import Singleton
    except ImportError:
        Singleton = None
    if Singleton is not None:

        @shared_task(base=Singleton, **PLAIN)
        def peer_celery_singleton(variant, run, n):
            one_row(variant, run, n)

        peers["celery_singleton"] = peer_celery_singleton
    return peers


PEERS = _peer_tasks()
