"""The example's own tests: what a project writes to show its tasks run once per message.

Run them from example_project/ with pytest-django:

    python -m pytest orders/tests.py --ds=shop.settings

dedup_celery.testing delivers each copy through Celery's tracer and the message
table, as a worker would; eager mode (task.apply()) could not show a duplicate.
"""

import pytest

from dedup_celery.testing import deliver, deliver_at_once

from orders.models import Inventory, Order
from orders.tasks import notify_customer, place_order, place_order_plain

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def stock():
    return Inventory.objects.create(good_id="lamp", count=10)


def test_an_order_message_delivered_twice_places_one_order(stock):
    copies = deliver(place_order, args=("A-1", "lamp"))
    assert copies.body_runs == 1
    assert Order.objects.filter(order_no="A-1").count() == 1
    stock.refresh_from_db()
    assert stock.count == 9


def test_the_plain_task_takes_an_item_too_many(stock):
    deliver(place_order_plain, args=("A-2", "lamp"))
    assert Order.objects.filter(order_no="A-2").count() == 1  # get_or_create kept it unique
    stock.refresh_from_db()
    assert stock.count == 8  # but the duplicate took a second item


def test_two_notifications_at_once_reach_the_customer_once(settings, tmp_path):
    settings.NOTIFICATIONS_FILE = tmp_path / "notifications.log"
    copies = deliver_at_once(notify_customer, args=("A-3", "ann@example.com"))
    assert copies.body_runs == 1
    assert "rescheduled" in copies.outcomes  # the second copy met the first one running
    assert settings.NOTIFICATIONS_FILE.read_text().splitlines() == ["A-3 -> ann@example.com"]


def test_a_notification_re_sent_under_a_new_task_id_is_a_duplicate(settings, tmp_path):
    settings.NOTIFICATIONS_FILE = tmp_path / "notifications.log"
    copies = deliver(notify_customer, args=("A-4", "bob@example.com"), same_id=False)
    assert copies.outcomes == ["ran", "skipped"]
    assert len(settings.NOTIFICATIONS_FILE.read_text().splitlines()) == 1
