"""System checks: every id, through the check functions and Django's run_checks()."""

from __future__ import annotations

import io
import logging

import pytest
from celery import Celery
from django.core.checks import run_checks
from django.core.management import call_command

from dedup_celery import DedupTask, checks
from dedup_celery.backends.base import BaseBackend


class NoTransactionsBackend(BaseBackend):
    """A backend without transactions (stands for any non-database store)."""


def ids(messages):
    return sorted(m.id for m in messages)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], ["dedup_celery.E001"]),
        ({"PROCESING_TIMEOUT": 5}, ["dedup_celery.E002"]),
        ({"PROCESSING_TIMEOUT": 0}, ["dedup_celery.E003"]),
        ({"RETRY_COUNTDOWN": -1}, ["dedup_celery.E003"]),
        ({"RECORD_TTL": "3600"}, ["dedup_celery.E003"]),
        ({"RECORD_TTL": True}, ["dedup_celery.E003"]),
        ({"RECORD_TTL": float("nan")}, ["dedup_celery.E003"]),
        ({"RESULT_MAX_BYTES": -1}, ["dedup_celery.E003"]),
        ({"HEARTBEAT_INTERVAL": 0}, ["dedup_celery.E003"]),
        ({"MAX_TAKEOVERS": 0}, ["dedup_celery.E003"]),
        ({"MAX_STORE_RESCHEDULES": 0}, ["dedup_celery.E003"]),
        ({"MAX_STORE_RESCHEDULES": True}, ["dedup_celery.E003"]),
        ({"MAX_STORE_RESCHEDULES": 10}, []),
        ({"PID_TAKEOVER": "no"}, ["dedup_celery.E003"]),
        ({"PID_TAKEOVER": False}, []),
        ({"RECORD_TTL": 10**12}, ["dedup_celery.E003"]),
        (
            {
                "PROCESSING_TIMEOUT": 100 * 365.25 * 24 * 3600,
                "RECORD_TTL": 100 * 365.25 * 24 * 3600,
            },
            [],
        ),
        ({"HEARTBEAT_INTERVAL": 10**11}, ["dedup_celery.E003"]),
        ({"HEARTBEAT_INTERVAL": 30, "MAX_TAKEOVERS": 3}, []),
        ({"BACKEND": ""}, ["dedup_celery.E003"]),
        ({"OPTIONS": []}, ["dedup_celery.E003"]),
        ({"DATABASE": "missing"}, ["dedup_celery.E005"]),
        ({"BACKEND": "no.such.Backend"}, ["dedup_celery.E004"]),
        ({"BACKEND": "nosuchalias"}, ["dedup_celery.E004"]),
        ({"BACKEND": "tests.test_checks.ids"}, ["dedup_celery.E004"]),
        ({"OPTIONS": {"bogus": 1}}, ["dedup_celery.E004"]),
        ({}, []),
        ({"BACKEND": "db", "DATABASE": "sqlite", "PROCESSING_TIMEOUT": 1.5}, []),
    ],
)
def test_settings_checks(settings, value, expected):
    settings.DEDUP_CELERY = value
    messages = checks.check_settings()
    assert ids(messages) == expected
    for message in messages:
        assert message.hint, "every error says what to set"


def test_an_unknown_key_is_named_in_the_message(settings):
    settings.DEDUP_CELERY = {"PROCESING_TIMEOUT": 5}
    (message,) = checks.check_settings()
    assert "'PROCESING_TIMEOUT'" in message.msg
    assert "PROCESSING_TIMEOUT" in message.hint


def test_a_bad_value_is_also_a_clear_error_at_use_time(settings):
    from dedup_celery.conf import get_settings
    from dedup_celery.exceptions import DedupConfigurationError

    settings.DEDUP_CELERY = {"RECORD_TTL": 0}
    with pytest.raises(DedupConfigurationError, match=r"RECORD_TTL.*dedup_celery.E003"):
        get_settings()


@pytest.fixture
def celery_app(monkeypatch):
    """A separate Celery app for the tasks one test defines (all named ``c.*``).

    Celery also adds every shared task to a new app when it is finalized, so
    :func:`task_messages` keeps only the messages about this test's tasks.
    """
    capp = Celery("checks", set_as_current=False)
    capp.conf.broker_url = "redis://127.0.0.1:6399/0"
    monkeypatch.setattr(checks, "_current_celery_app", lambda: capp)
    return capp


def task_messages():
    return [m for m in checks.check_celery_tasks() if str(m.obj).startswith("c.")]


def test_a_clean_dedup_task_has_no_messages(celery_app):
    @celery_app.task(shared=False, base=DedupTask, name="c.clean")
    def clean():
        pass

    assert ids(task_messages()) == []


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"acks_late": False}, ["dedup_celery.W001"]),
        ({"reject_on_worker_lost": False}, ["dedup_celery.W002"]),
        ({"track_started": True}, ["dedup_celery.W003"]),
        ({"dedup_retry_countdown": 3600}, ["dedup_celery.W004"]),
        ({"dedup_record_ttl": 10**12}, ["dedup_celery.E007"]),
        ({"dedup_record_ttl": 60}, ["dedup_celery.W005"]),
        ({"max_retries": 1000, "default_retry_delay": 3600}, ["dedup_celery.W005"]),
        ({"time_limit": 900}, ["dedup_celery.W006"]),
        ({"time_limit": 900, "dedup_processing_timeout": 1000}, []),
        ({"time_limit": 900, "dedup_heartbeat_interval": 60}, []),
        ({"dedup_heartbeat_interval": 400}, ["dedup_celery.W009"]),
        ({"dedup_heartbeat_interval": 0}, ["dedup_celery.E007"]),
        ({"dedup_key": "order_no"}, ["dedup_celery.E007"]),
        ({"dedup_processing_timeout": 0}, ["dedup_celery.E007"]),
        ({"dedup_transactional": "yes"}, ["dedup_celery.E007"]),
        ({"dedup_scope": ""}, ["dedup_celery.E007"]),
        ({"dedup_scope": "s" * 256}, ["dedup_celery.E007"]),
        ({"dedup_on_enqueue": "queued", "dedup_queue_ttl": 600}, ["dedup_celery.W012"]),
        ({"dedup_on_enqueue": "queued"}, []),  # the default TTL, an hour, is not below it
        ({"dedup_on_enqueue": "consumed", "dedup_queue_ttl": 600}, []),
        ({"dedup_on_enqueue": True}, ["dedup_celery.E007"]),
        ({"dedup_on_enqueue": "queued", "dedup_transactional": True}, ["dedup_celery.E007"]),
    ],
)
def test_task_checks(celery_app, options, expected):
    @celery_app.task(shared=False, base=DedupTask, name="c.task", **options)
    def task():
        pass

    messages = task_messages()
    assert ids(messages) == expected
    assert all(m.obj == "c.task" for m in messages)


def test_a_scope_shared_by_a_status_and_a_transactional_task(celery_app):
    @celery_app.task(shared=False, base=DedupTask, name="c.status", dedup_scope="orders")
    def status():
        pass

    @celery_app.task(
        shared=False, base=DedupTask, name="c.tx", dedup_scope="orders", dedup_transactional=True
    )
    def tx():
        pass

    @celery_app.task(
        shared=False, base=DedupTask, name="c.tx2", dedup_scope="other", dedup_transactional=True
    )
    def tx2():
        pass

    (message,) = task_messages()
    assert message.id == "dedup_celery.E006"
    assert "'orders'" in message.msg
    assert "c.status" in message.msg
    assert "c.tx" in message.msg


def test_transactional_task_on_a_backend_without_transactions(celery_app, settings):
    settings.DEDUP_CELERY = {"BACKEND": "tests.test_checks.NoTransactionsBackend"}

    @celery_app.task(shared=False, base=DedupTask, name="c.tx", dedup_transactional=True)
    def tx():
        pass

    assert ids(task_messages()) == ["dedup_celery.E008"]


def test_visibility_timeout_warnings_follow_the_broker(celery_app):
    @celery_app.task(shared=False, base=DedupTask, name="c.task", dedup_retry_countdown=20)
    def task():
        pass

    celery_app.conf.broker_transport_options = {"visibility_timeout": 10}
    assert ids(task_messages()) == ["dedup_celery.W004"]
    celery_app.conf.broker_url = "amqp://127.0.0.1:5699//"
    assert ids(task_messages()) == []


def test_an_uninspectable_celery_app_is_a_warning_not_a_crash(monkeypatch):
    def broken():
        raise RuntimeError("no app here")

    monkeypatch.setattr(checks, "_current_celery_app", broken)
    (message,) = checks.check_celery_tasks()
    assert message.id == "dedup_celery.W007"
    assert "no app here" in message.msg


@pytest.mark.django_db
def test_celery_warnings_never_stop_migrate(celery_app):
    @celery_app.task(shared=False, base=DedupTask, name="c.task", acks_late=False)
    def task():
        pass

    assert "dedup_celery.W001" in ids(run_checks(tags=[checks.TAG]))
    # call_command skips the checks unless told otherwise; migrate runs them here,
    # and a serious message would raise SystemCheckError.
    err = io.StringIO()
    call_command("migrate", "dedup_celery", verbosity=0, skip_checks=False, stderr=err)
    assert "dedup_celery.W001" in err.getvalue()


def test_the_test_project_itself_is_clean():
    assert run_checks(tags=[checks.TAG]) == []


def test_worker_ready_logs_the_check_messages(celery_app, caplog):
    @celery_app.task(shared=False, base=DedupTask, name="c.task", track_started=True)
    def task():
        pass

    with caplog.at_level(logging.WARNING, logger="dedup_celery.checks"):
        checks.log_check_messages(sender=None)
    assert "dedup_celery.W003" in caplog.text


def test_a_starting_worker_with_check_errors_exits_unless_they_are_silenced(settings):
    from dedup_celery.checks import refuse_to_start_on_errors

    settings.DEDUP_CELERY = {"RETRY_COUNTDOWNN": 1}
    with pytest.raises(SystemExit) as exited:
        refuse_to_start_on_errors(sender=None)
    assert "dedup_celery.E002" in str(exited.value)
    assert "unknown key 'RETRY_COUNTDOWNN'" in str(exited.value)
    settings.SILENCED_SYSTEM_CHECKS = ["dedup_celery.E002"]
    refuse_to_start_on_errors(sender=None)  # silenced: it starts
    settings.DEDUP_CELERY = {}
    settings.SILENCED_SYSTEM_CHECKS = []
    refuse_to_start_on_errors(sender=None)


def test_one_finding_in_the_same_words_is_one_message_naming_every_task(celery_app):
    def body():  # Celery builds a signature check from the function: not a lambda
        pass

    for name in ("c.one", "c.two", "c.three"):
        celery_app.task(shared=False, base=DedupTask, name=name, acks_late=False)(body)
    celery_app.task(shared=False, base=DedupTask, name="c.long", dedup_retry_countdown=3600)(body)
    messages = task_messages()
    assert ids(messages) == ["dedup_celery.W001", "dedup_celery.W004"]
    (grouped,) = [m for m in messages if m.id == "dedup_celery.W001"]
    assert grouped.obj == "c.one, c.three, c.two"
    assert grouped.msg.startswith("3 tasks 'c.one', 'c.three', 'c.two': acks_late=False")
    (single,) = [m for m in messages if m.id == "dedup_celery.W004"]
    assert single.msg.startswith("Task 'c.long': RETRY_COUNTDOWN (3600 s)")


@pytest.mark.parametrize(
    ("value", "names", "not_named"),
    [
        ({"BACKEND": "no.such.Backend"}, 'DEDUP_CELERY["BACKEND"]', "OPTIONS"),
        ({"OPTIONS": {"bogus": 1}}, 'DEDUP_CELERY["OPTIONS"]', "BACKEND"),
        ({"BACKEND": "redis", "OPTIONS": {}}, 'DEDUP_CELERY["OPTIONS"]', "BACKEND"),
        ({"BACKEND": "redis", "OPTIONS": {"url": "redis://x"}, "DATABASE": "default"},
         'DEDUP_CELERY["DATABASE"]', "OPTIONS"),
    ],
)  # fmt: skip
def test_the_backend_error_s_hint_names_the_key_that_is_wrong(settings, value, names, not_named):
    settings.DEDUP_CELERY = value
    (message,) = checks.check_settings()
    assert message.id == "dedup_celery.E004"
    assert names in message.hint
    assert not_named not in message.hint


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_the_worker_start_warning_when_celery_closes_connections_per_task(
    celery_app, monkeypatch, settings
):
    import celery

    celery_app.conf.CELERY_DB_REUSE_MAX = None
    warning = checks.connection_handling_warning(celery_app)
    assert warning.startswith("dedup_celery.W010: Celery ")
    assert "CELERY_DB_REUSE_MAX = 1000" in warning
    celery_app.conf.CELERY_DB_REUSE_MAX = 1000
    assert checks.connection_handling_warning(celery_app) is None
    # Celery 5.4 and 5.5 honour CONN_MAX_AGE instead.
    celery_app.conf.CELERY_DB_REUSE_MAX = None
    monkeypatch.setattr(celery, "VERSION", celery.version_info_t(5, 5, 3, "", ""))
    settings.DATABASES = {
        alias: {**db, "CONN_MAX_AGE": 0 if alias == "default" else 600}
        for alias, db in settings.DATABASES.items()
    }
    warning = checks.connection_handling_warning(celery_app)
    assert "Celery 5.5's Django fixup closes the connections of default after each task" in warning
    settings.DATABASES = {a: {**db, "CONN_MAX_AGE": 600} for a, db in settings.DATABASES.items()}
    assert checks.connection_handling_warning(celery_app) is None
    celery_app.fixups = set()
    assert checks.connection_handling_warning(celery_app) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"BYPASS": True}, []),
        ({"BYPASS": ["shop.tasks.ship"]}, []),
        ({"BYPASS": "yes"}, ["dedup_celery.E003"]),
        ({"BYPASS": [""]}, ["dedup_celery.E003"]),
        ({"BYPASS": [3]}, ["dedup_celery.E003"]),
    ],
)
def test_the_bypass_setting_is_validated(settings, value, expected):
    settings.DEDUP_CELERY = value
    assert ids(checks.check_settings()) == expected


def test_every_bypassed_task_is_named_in_one_warning(celery_app, settings):
    def body():
        pass

    settings.DEDUP_CELERY = {"BYPASS": ["c.named"]}
    celery_app.task(shared=False, base=DedupTask, name="c.named")(body)
    celery_app.task(shared=False, base=DedupTask, name="c.own", dedup_bypass=True)(body)
    celery_app.task(shared=False, base=DedupTask, name="c.kept")(body)
    celery_app.task(shared=False, base=DedupTask, name="c.bad", dedup_bypass="yes")(body)
    messages = task_messages()
    assert ids(messages) == ["dedup_celery.E007", "dedup_celery.W011"]
    (warning,) = [m for m in messages if m.id == "dedup_celery.W011"]
    assert warning.obj == "c.named, c.own"
    assert warning.msg.startswith("2 tasks 'c.named', 'c.own': dedup is bypassed")


@pytest.mark.parametrize(
    "broken",
    [{"RETRY_COUNTDOWNN": 1}, {"MAX_TAKEOVERS": 0}, {"DATABASE": "nowhere"}],
    ids=["unknown-key", "bad-value", "bad-database"],
)
def test_every_check_runs_with_a_broken_configuration_and_reports_it(settings, broken):
    # Django's own checks (the admin's among them) read the package's admin: none may
    # raise on a broken DEDUP_CELERY, or a worker dies with a traceback instead of the
    # package's list of errors (Celery's Django fixup runs every check at start).
    settings.DEDUP_CELERY = broken
    found = ids(run_checks())
    assert {"dedup_celery.E002", "dedup_celery.E003", "dedup_celery.E005"} & set(found)
