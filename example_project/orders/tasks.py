"""The order tasks: what a user of dedup_celery writes.

An "order placed" message must insert the order and take one item off the
inventory exactly once, however often the message arrives.
"""

from celery import shared_task
from django.conf import settings
from django.db.models import F

from dedup_celery import DedupTask

from orders.models import Inventory, Order


@shared_task(base=DedupTask, dedup_transactional=True)
def place_order(order_no, good_id):
    """Insert the order and take one item: the claim commits with them, so exactly once."""
    Order.objects.create(order_no=order_no, good_id=good_id)
    Inventory.objects.filter(good_id=good_id).update(count=F("count") - 1)


@shared_task(base=DedupTask, dedup_key=lambda order_no, *args, **kwargs: f"order:{order_no}")
def notify_customer(order_no, email):
    """Tell the customer, once per order: a side effect outside the database (status mode)."""
    with open(settings.NOTIFICATIONS_FILE, "a") as outbox:
        outbox.write(f"{order_no} -> {email}\n")


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def place_order_plain(order_no, good_id):
    """The same work as place_order without dedup, for contrast.

    get_or_create keeps the order itself unique, as a careful author would;
    the inventory still pays for every duplicate.
    """
    Inventory.objects.filter(good_id=good_id).update(count=F("count") - 1)
    Order.objects.get_or_create(order_no=order_no, defaults={"good_id": good_id})
