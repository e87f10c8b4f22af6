"""The example project: an order/inventory shop whose tasks use dedup_celery."""

from shop.celery import app as celery_app

__all__ = ["celery_app"]
