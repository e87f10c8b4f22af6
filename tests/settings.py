"""Django settings for the test suite and for the worker processes the tests start.

Service addresses come from environment variables that the session fixtures set
(see tests/conftest.py); every service is a throwaway one on 127.0.0.1.
"""

import json
import os
import tempfile

# Worker processes inherit the test session's folder; only the session makes one.
TMP_DIR = os.environ.get("DEDUP_TEST_TMP") or os.environ.setdefault(
    "DEDUP_TEST_TMP", tempfile.mkdtemp(prefix="dedup-celery-tests-")
)

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "dedup_celery",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("DEDUP_TEST_PG_PORT", "5432"),
        "NAME": os.environ.get("DEDUP_TEST_PG_NAME", "dedup_celery"),
        "USER": "postgres",
        "PASSWORD": "",
        "TEST": {"NAME": "test_dedup_celery"},
    },
    "sqlite": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(TMP_DIR, "dedup.sqlite3"),
        "OPTIONS": {"timeout": 5},
        "TEST": {"NAME": os.path.join(TMP_DIR, "test_dedup.sqlite3")},
    },
    # The session's throwaway MariaDB (tests/conftest.py sets the port).
    "mysql": {
        "ENGINE": "django.db.backends.mysql",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("DEDUP_TEST_MYSQL_PORT", "3306"),
        "NAME": os.environ.get("DEDUP_TEST_MYSQL_NAME", "dedup_celery"),
        "USER": "root",
        "PASSWORD": "",
        "OPTIONS": {"charset": "utf8mb4"},
        "TEST": {
            "NAME": "test_dedup_celery",
            "CHARSET": "utf8mb4",
            "COLLATION": "utf8mb4_unicode_ci",
        },
    },
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

CELERY_BROKER_URL = os.environ.get("DEDUP_TEST_BROKER_URL", "memory://")
CELERY_RESULT_BACKEND = os.environ.get("DEDUP_TEST_RESULT_BACKEND", "django-db") or None
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
if os.environ.get("DEDUP_TEST_VISIBILITY_TIMEOUT"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": float(os.environ["DEDUP_TEST_VISIBILITY_TIMEOUT"]),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }

DEDUP_CELERY = {"RETRY_COUNTDOWN": 1}
if os.environ.get("DEDUP_TEST_STORE_URL"):
    DEDUP_CELERY = {
        "BACKEND": "redis",
        "OPTIONS": {"url": os.environ["DEDUP_TEST_STORE_URL"], "key_prefix": "scenario:"},
        "RETRY_COUNTDOWN": 1,
    }
    # The test app's transactional tasks are never sent to a Redis-store worker;
    # silenced, E008 does not keep that worker from starting.
    SILENCED_SYSTEM_CHECKS = ["dedup_celery.E008"]
DEDUP_CELERY.update(json.loads(os.environ.get("DEDUP_TEST_DEDUP_EXTRA") or "{}"))
