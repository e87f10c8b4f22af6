"""The order tasks: what a user of dedup_celery writes."""

from celery import shared_task
from django.db.models import F

from dedup_celery import DedupTask

from orders.models import Inventory, Order, PlainOrder


@shared_task(base=DedupTask, dedup_transactional=True)
def place_order(order_no, good_id):
    """Insert the order and take one item from the inventory, exactly once per message."""
    Order.objects.create(order_no=order_no, good_id=good_id)
    Inventory.objects.filter(good_id=good_id).update(count=F("count") - 1)


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def place_order_plain(order_no, good_id):
    """The same work without dedup, for contrast."""
    PlainOrder.objects.create(order_no=order_no, good_id=good_id)
    Inventory.objects.filter(good_id=f"plain-{good_id}").update(count=F("count") - 1)
