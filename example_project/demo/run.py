"""Run the order/inventory story and report what each task did.

``make demo`` runs this file. It resets example_project/var/, migrates, starts a
real Celery worker (prefork, two processes), sends N "order placed" messages the
way real brokers and producers deliver them (some re-sent, some as copies in
flight at once, some whose worker child is SIGKILLed after commit), to three
tasks: the transactional ``place_order``, the status-mode ``notify_customer``
and ``place_order_plain`` without dedup. Then it prints a table and stops the
worker. It exits with status 1 if a dedup task applied a message twice or lost one.

With ``DATABASE_URL=postgres://...`` and ``CELERY_BROKER_URL=redis://...`` the
same story runs on real servers, plus countdown messages longer than the Redis
visibility timeout, which Redis redelivers.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

# The example project: demo/ sits inside it, beside shop/ and orders/.
HERE = Path(__file__).resolve().parent.parent
N_ORDERS = int(os.environ.get("SHOP_DEMO_ORDERS", "200"))
SEED = 2026
STOCK = 10_000
GOOD, PLAIN_GOOD = "widget", "widget-plain"
VISIBILITY_TIMEOUT = 3


def setup_django() -> None:
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
    import django

    django.setup()


class Plan:
    """Which messages go out, how often and how (fixed by the seed)."""

    def __init__(self, n: int, seed: int, redis_broker: bool) -> None:
        rng = random.Random(seed)
        self.orders = [f"D-{i:04d}" for i in range(n)]
        self.plain_orders = [f"P-{i:04d}" for i in range(n)]
        self.ids = {
            task: [str(uuid.uuid4()) for _ in range(n)] for task in ("place", "notify", "plain")
        }
        picks = rng.sample(range(n), k=n // 2)
        self.resent = set(picks[: n // 5])  # re-sent later by the producer, same task id
        self.copies = set(picks[n // 5 : n // 5 + n // 10])  # two copies in flight at once
        self.killed = set(picks[n // 5 + n // 10 : n // 5 + n // 10 + 2])  # child killed
        # notify_customer is keyed by order number: a producer re-send with a new task id
        self.renotified = set(rng.sample(range(n), k=n // 10))
        self.late = set(rng.sample(range(n), k=5)) if redis_broker else set()

    def kill_ids(self) -> list[str]:
        return [self.ids[task][i] for task in self.ids for i in self.killed]


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - the worker writes to it until it stops
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "shop",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=HERE,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while " ready." not in log_path.read_text(errors="replace"):
        if worker.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the worker did not start; see {log_path}")
        time.sleep(0.2)
    return worker


def stop_worker(worker: subprocess.Popen) -> None:
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def send_all(plan: Plan) -> dict[str, int]:
    """Publish every message of the plan; return how many each task was sent."""
    from orders.tasks import notify_customer, place_order, place_order_plain

    sent = {"place_order": 0, "notify_customer": 0, "place_order_plain": 0}

    def send(task, name, args, task_id, times=1, **options):
        for _ in range(times):
            task.apply_async(args=args, task_id=task_id, **options)
            sent[name] += 1

    for i, order_no in enumerate(plan.orders):
        copies = 2 if i in plan.copies else 1
        late = {"countdown": VISIBILITY_TIMEOUT * 2} if i in plan.late else {}
        send(place_order, "place_order", (order_no, GOOD), plan.ids["place"][i], copies, **late)
        send(
            notify_customer,
            "notify_customer",
            (order_no, f"c{i}@example.com"),
            plan.ids["notify"][i],
            copies,
            **late,
        )
        send(
            place_order_plain,
            "place_order_plain",
            (plan.plain_orders[i], PLAIN_GOOD),
            plan.ids["plain"][i],
            copies,
            **late,
        )
    for i in sorted(plan.resent):
        send(place_order, "place_order", (plan.orders[i], GOOD), plan.ids["place"][i])
        send(
            notify_customer,
            "notify_customer",
            (plan.orders[i], f"c{i}@example.com"),
            plan.ids["notify"][i],
        )
        send(
            place_order_plain,
            "place_order_plain",
            (plan.plain_orders[i], PLAIN_GOOD),
            plan.ids["plain"][i],
        )
    for i in sorted(plan.renotified):
        send(
            notify_customer,
            "notify_customer",
            (plan.orders[i], f"c{i}@example.com"),
            str(uuid.uuid4()),
        )
    return sent


def progress(done: int, total: int, _shown: list[int] = [-1]) -> None:  # noqa: B006
    """Draw a progress bar: redrawn in place on a terminal, a line per tenth otherwise."""
    width = 40
    done = min(done, total)
    filled = width * done // max(total, 1)
    bar = f"  [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
    if sys.stdout.isatty():
        print(f"\r{bar}", end="", flush=True)
    elif filled // 4 != _shown[0]:
        _shown[0] = filled // 4
        print(bar, flush=True)


def main() -> int:
    var = Path(os.environ.get("SHOP_VAR_DIR", HERE / "var"))
    shutil.rmtree(var, ignore_errors=True)
    demo_dir = var / "demo"
    setup_django()
    demo_dir.mkdir(parents=True, exist_ok=True)
    from django.conf import settings
    from django.core.management import call_command
    from django.db.models import Sum

    from dedup_celery.models import DedupRecord

    from orders.models import Inventory, Order
    from orders.tasks import notify_customer, place_order

    redis_broker = settings.CELERY_BROKER_URL.startswith("redis")
    plan = Plan(N_ORDERS, SEED, redis_broker)
    (demo_dir / "kill_ids.txt").write_text("\n".join(plan.kill_ids()))
    call_command("migrate", verbosity=0)
    Order.objects.all().delete()
    DedupRecord.objects.all().delete()
    Inventory.objects.all().delete()
    Inventory.objects.create(good_id=GOOD, count=STOCK)
    Inventory.objects.create(good_id=PLAIN_GOOD, count=STOCK)
    notifications = Path(settings.NOTIFICATIONS_FILE)
    notifications.unlink(missing_ok=True)

    env = {**os.environ, "SHOP_DEMO_DIR": str(demo_dir), "PYTHONPATH": str(HERE.parent)}
    if redis_broker:
        env["SHOP_VISIBILITY_TIMEOUT"] = str(VISIBILITY_TIMEOUT)
    where = "PostgreSQL" if os.environ.get("DATABASE_URL") else "SQLite"
    broker = "Redis" if redis_broker else "the filesystem transport"
    print(f"dedup_celery demo: {N_ORDERS} orders, seed {SEED}, on {where} and {broker}.")
    worker = start_worker(env, var / "worker.log")
    try:
        sent = send_all(plan)
        plain_runs_expected = sent["place_order_plain"] + len(plan.killed)
        duplicates = {name: sent[name] - N_ORDERS for name in ("place_order", "notify_customer")}
        total = 2 * N_ORDERS + sum(duplicates.values()) + plain_runs_expected

        def skipped(task) -> int:
            records = DedupRecord.objects.filter(task_name=task.name)
            return records.aggregate(n=Sum("skipped"))["n"] or 0

        def body_runs(name: str) -> int:
            log = demo_dir / "body_runs.log"
            lines = log.read_text().splitlines() if log.exists() else []
            return sum(line.split()[0].endswith(f".{name}") for line in lines)

        def lines_in(path: Path) -> int:
            return len(path.read_text().splitlines()) if path.exists() else 0

        def done() -> int:
            return (
                min(Order.objects.filter(order_no__startswith="D-").count(), N_ORDERS)
                + min(skipped(place_order), duplicates["place_order"])
                + min(lines_in(notifications), N_ORDERS)
                + min(skipped(notify_customer), duplicates["notify_customer"])
                + min(body_runs("place_order_plain"), plain_runs_expected)
            )

        print(f"Sent {sum(sent.values())} messages; waiting for the worker:")
        deadline = time.monotonic() + 300
        while (count := done()) < total and time.monotonic() < deadline:
            progress(count, total)
            time.sleep(0.5)
        progress(done(), total)
        if sys.stdout.isatty():
            print()
        time.sleep(2)  # let stray copies show up before counting
    finally:
        stop_worker(worker)

    rows = []
    failed = False
    for name, task, good, prefix in (
        ("place_order", place_order, GOOD, "D-"),
        ("notify_customer", notify_customer, None, None),
        ("place_order_plain", None, PLAIN_GOOD, "P-"),
    ):
        records = DedupRecord.objects.filter(task_name=task.name) if task else None
        dup_skipped = (records.aggregate(n=Sum("skipped"))["n"] or 0) if task else 0
        dup_rescheduled = (records.aggregate(n=Sum("rescheduled"))["n"] or 0) if task else 0
        if good:
            placed = Order.objects.filter(order_no__startswith=prefix).count()
            taken = STOCK - Inventory.objects.get(good_id=good).count
            double = max(placed - N_ORDERS, taken - N_ORDERS, 0)
            lost = N_ORDERS - min(placed, taken)
        else:
            placed = taken = "-"
            sent_notes = lines_in(notifications)
            double = max(sent_notes - N_ORDERS, 0)
            lost = max(N_ORDERS - sent_notes, 0)
        if task is not None and (double or lost):
            failed = True
        rows.append(
            (name, sent[name], body_runs(name), placed, taken, dup_skipped, dup_rescheduled, double)
        )
    header = (
        "task",
        "messages sent",
        "body runs",
        "orders placed",
        "inventory taken",
        "dup. skipped",
        "dup. rescheduled",
        "double-applied",
    )
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows, strict=True)]
    print()
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths, strict=True)))
    print()
    killed = len(list(demo_dir.glob("killed-*")))
    print(f"{killed} worker children were SIGKILLed after commit, before the ack.")
    if failed:
        print("FAILED: a dedup task applied a message twice, or lost one.")
        return 1
    print(
        "OK: every order placed, every item taken and every customer notified exactly once "
        "by the dedup tasks."
    )
    print(f"Worker log: {var / 'worker.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
