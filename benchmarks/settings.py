"""Django settings for the benchmark scripts (services started by the scripts themselves)."""

import os

SECRET_KEY = "benchmarks-only"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "dedup_celery"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("DEDUP_BENCH_PG_PORT", "5432"),
        "NAME": "postgres",
        "USER": "postgres",
        "CONN_MAX_AGE": None,
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DEDUP_CELERY = {}
