"""The example project's Celery app."""

import os

from celery import Celery
from celery.signals import worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

app = Celery("shop")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _load_demo_hooks(**kwargs):
    # Only the worker that demo/run.py starts sets SHOP_DEMO_DIR; the example
    # itself knows nothing of the demo's instrumentation.
    if os.environ.get("SHOP_DEMO_DIR"):
        import demo.hooks  # noqa: F401
