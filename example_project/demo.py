"""Run the example: send every order message twice, and count what each task did.

``make demo`` runs this file. It resets example_project/var/, migrates, starts a
real Celery worker (prefork, two processes), sends N "order placed" messages
twice each (a producer re-send, both copies in flight together) to the
dedup_celery task and to a plain task, waits, prints a table and stops the
worker. It exits with status 1 if the dedup task ever applied an order twice.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_ORDERS = 40
GOOD = "good-1"
STOCK = 1000


def setup_django() -> None:
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
    import django

    django.setup()


def start_worker(log_path: Path) -> subprocess.Popen:
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


def main() -> int:
    var = Path(os.environ.get("SHOP_VAR_DIR", HERE / "var"))
    shutil.rmtree(var, ignore_errors=True)
    setup_django()
    from django.core.management import call_command
    from django.db.models import Sum

    from dedup_celery.models import DedupRecord

    from orders.models import Inventory, Order, PlainOrder
    from orders.tasks import place_order, place_order_plain

    call_command("migrate", verbosity=0)
    Inventory.objects.create(good_id=GOOD, count=STOCK)
    Inventory.objects.create(good_id=f"plain-{GOOD}", count=STOCK)

    worker = start_worker(var / "worker.log")
    try:
        print(f"Sending {N_ORDERS} orders, each message twice, to both tasks...")
        for i in range(N_ORDERS):
            order_no = f"order-{i:04d}"
            for task in (place_order, place_order_plain):
                task_id = str(uuid.uuid4())
                for _copy in range(2):  # the producer re-sends the same message
                    task.apply_async(args=(order_no, GOOD), task_id=task_id)

        def dedup_done() -> bool:
            skipped = DedupRecord.objects.aggregate(n=Sum("skipped"))["n"] or 0
            return Order.objects.count() >= N_ORDERS and skipped >= N_ORDERS

        deadline = time.monotonic() + 120
        while not (dedup_done() and PlainOrder.objects.count() >= 2 * N_ORDERS):
            if time.monotonic() > deadline:
                print("Timed out waiting for the worker; the counts below are partial.")
                break
            time.sleep(0.5)
        time.sleep(1)
    finally:
        stop_worker(worker)

    records = DedupRecord.objects.filter(task_name=place_order.name)
    skipped = records.aggregate(n=Sum("skipped"))["n"] or 0
    rescheduled = records.aggregate(n=Sum("rescheduled"))["n"] or 0
    rows = [
        (
            "place_order",
            2 * N_ORDERS,
            Order.objects.count(),
            STOCK - Inventory.objects.get(good_id=GOOD).count,
            skipped,
            rescheduled,
        ),
        (
            "place_order_plain",
            2 * N_ORDERS,
            PlainOrder.objects.count(),
            STOCK - Inventory.objects.get(good_id=f"plain-{GOOD}").count,
            0,
            0,
        ),
    ]
    header = (
        "task",
        "messages",
        "orders placed",
        "inventory taken",
        "dup. skipped",
        "dup. rescheduled",
        "double-applied",
    )
    print()
    print(" | ".join(f"{h:>17}" for h in header))
    failed = False
    for name, sent, placed, taken, dup_skipped, dup_rescheduled in rows:
        double = max(placed - N_ORDERS, taken - N_ORDERS, 0)
        if name == "place_order" and (double or placed != N_ORDERS):
            failed = True
        values = (name, sent, placed, taken, dup_skipped, dup_rescheduled, double)
        print(" | ".join(f"{v:>17}" for v in values))
    print()
    if failed:
        print("FAILED: the dedup task placed an order a number of times other than once.")
        return 1
    print(f"OK: every order placed once by place_order. Worker log: {var / 'worker.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
