"""Django settings for the benchmark scripts (they start their own servers and pass ports)."""

import os

SECRET_KEY = "benchmarks-only"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "dedup_celery",
    "benchmarks.benchapp",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("DEDUP_BENCH_PG_PORT", "5432"),
        "NAME": os.environ.get("DEDUP_BENCH_PG_NAME", "postgres"),
        "USER": "postgres",
    }
}
if os.environ.get("DEDUP_BENCH_SQLITE"):
    # benchmarks/overhead.py stubs the store out and needs no server.
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CELERY_BROKER_URL = os.environ.get("DEDUP_BENCH_BROKER_URL", "memory://")
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 4
if os.environ.get("DEDUP_BENCH_DB_REUSE_MAX"):
    # Celery's Django fixup then keeps connections open between tasks.
    CELERY_DB_REUSE_MAX = int(os.environ["DEDUP_BENCH_DB_REUSE_MAX"])

# The peers (benchmarks only): celery-once and celery-singleton keep their locks in
# Redis; Celery's worker_deduplicate_successful_tasks reads the result backend.
_BROKER = os.environ.get("DEDUP_BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_ONCE = {
    "backend": "celery_once.backends.Redis",
    "settings": {"url": _BROKER[:-1] + "4", "default_timeout": 3600},
}
CELERY_SINGLETON_BACKEND_URL = _BROKER[:-1] + "5"
if os.environ.get("DEDUP_BENCH_RESULTS"):
    CELERY_RESULT_BACKEND = _BROKER[:-1] + "3"
    CELERY_WORKER_DEDUPLICATE_SUCCESSFUL_TASKS = True

DEDUP_CELERY = {}
if os.environ.get("DEDUP_BENCH_STORE_URL"):
    DEDUP_CELERY = {"BACKEND": "redis", "OPTIONS": {"url": os.environ["DEDUP_BENCH_STORE_URL"]}}
    # This worker only consumes the status-mode queue; the transactional tasks it
    # also imports never reach it, so their check (no transactions on Redis) is silenced.
    SILENCED_SYSTEM_CHECKS = ["dedup_celery.E008"]
