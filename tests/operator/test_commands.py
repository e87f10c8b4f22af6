"""dedup_purge, the purge task for beat, and migrations being up to date."""

from __future__ import annotations

import io
import time
import uuid

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from dedup_celery import get_backend
from dedup_celery.keys import nested_key
from dedup_celery.models import DedupRecord
from dedup_celery.tasks import purge_expired
from tests.helpers import hold


def make(key, lease):
    """A PROCESSING record; a short one is due for purging soon after its lease."""
    hold("cmd", key, lease=lease, ttl=60 if lease > 1 else 0.1)


@pytest.mark.django_db(transaction=True)
def test_dedup_purge_dry_run_then_purge_in_batches():
    make("live", 60)
    for i in range(3):
        make(f"old-{i}", 0.2)
    time.sleep(0.5)
    out = io.StringIO()
    call_command("dedup_purge", "--dry-run", stdout=out)
    assert out.getvalue().startswith("3 expired record(s) would be deleted")
    assert DedupRecord.objects.count() == 4
    out = io.StringIO()
    call_command("dedup_purge", "--batch-size", "2", "--pause", "0.01", stdout=out)
    assert out.getvalue().startswith("3 expired record(s) deleted")
    assert list(DedupRecord.objects.values_list("key", flat=True)) == ["live"]


@pytest.mark.django_db(transaction=True)
def test_dedup_purge_rejects_a_bad_batch_size_or_pause():
    with pytest.raises(CommandError, match="--batch-size"):
        call_command("dedup_purge", "--batch-size", "0")
    with pytest.raises(CommandError, match="--pause"):
        call_command("dedup_purge", "--pause", "-1")


@pytest.mark.django_db(transaction=True)
def test_the_purge_task_for_beat():
    make("old", 0.2)
    time.sleep(0.5)
    assert purge_expired() == 1
    assert not DedupRecord.objects.exists()


@pytest.mark.django_db
def test_migrations_are_up_to_date():
    call_command("makemigrations", "dedup_celery", "--check", "--dry-run", verbosity=0)


@pytest.fixture(params=["db", "redis"])
def any_backend(request, settings):
    if request.param == "redis":
        url = f"{request.getfixturevalue('redis_url')}/6"
        settings.DEDUP_CELERY = {
            "BACKEND": "redis",
            "OPTIONS": {"url": url, "key_prefix": f"cmd:{uuid.uuid4().hex[:8]}:"},
        }
    return get_backend()


def claim_on(backend, key, lease):
    return hold("cmd", key, backend=backend, task_id=f"tid-{key}", lease=lease)


@pytest.mark.django_db(transaction=True)
def test_dedup_inspect_prints_the_record_by_key_or_digest(any_backend):
    made = claim_on(any_backend, "order:7", 60)
    out = io.StringIO()
    call_command("dedup_inspect", "cmd", "order:7", stdout=out)
    assert made.owner in out.getvalue()
    assert "processing" in out.getvalue()
    out = io.StringIO()
    call_command("dedup_inspect", "cmd", made.key_digest, "--digest", stdout=out)
    assert "tid-order:7" in out.getvalue()
    with pytest.raises(CommandError, match="No record"):
        call_command("dedup_inspect", "cmd", "order:8")
    with pytest.raises(CommandError, match="64 lowercase hex"):
        call_command("dedup_inspect", "cmd", "nothex", "--digest")


@pytest.mark.django_db(transaction=True)
def test_dedup_inspect_finds_a_replacement_by_its_nesting(any_backend):
    """The command derives a replacement's key as its delivery does: <key>#r<nesting>."""
    made = claim_on(any_backend, nested_key("order:9", 2), 60)
    out = io.StringIO()
    call_command("dedup_inspect", "cmd", "order:9", "--replaced", "2", stdout=out)
    assert made.owner in out.getvalue()
    with pytest.raises(CommandError, match="No record"):
        call_command("dedup_inspect", "cmd", "order:9")
    with pytest.raises(CommandError, match="leave out --digest"):
        call_command("dedup_inspect", "cmd", made.key_digest, "--digest", "--replaced", "2")


@pytest.mark.django_db(transaction=True)
def test_dedup_release_spares_a_live_lease_unless_forced(any_backend):
    made = claim_on(any_backend, "live", 60)
    with pytest.raises(CommandError, match="lease is live"):
        call_command("dedup_release", "cmd", "live", stdout=io.StringIO())
    assert any_backend.get("cmd", made.key_digest) is not None
    out = io.StringIO()
    call_command("dedup_release", "cmd", "live", "--force", stdout=out)
    assert "Released" in out.getvalue()
    assert any_backend.get("cmd", made.key_digest) is None


@pytest.mark.django_db(transaction=True)
def test_dedup_release_of_an_expired_lease_compares_the_owner(any_backend):
    made = claim_on(any_backend, "old", 0.2)
    time.sleep(0.4)
    with pytest.raises(CommandError, match="owner changed"):
        call_command(
            "dedup_release", "cmd", "old", "--owner", uuid.uuid4().hex, stdout=io.StringIO()
        )
    call_command("dedup_release", "cmd", "old", "--owner", made.owner, stdout=io.StringIO())
    assert any_backend.get("cmd", made.key_digest) is None


@pytest.mark.django_db(transaction=True)
def test_dedup_release_refuses_a_consumed_record(any_backend):
    made = claim_on(any_backend, "done", 60)
    any_backend.complete(made, None)
    with pytest.raises(CommandError, match="consumed, not processing or poisoned"):
        call_command("dedup_release", "cmd", "done", "--force", stdout=io.StringIO())


@pytest.mark.django_db(transaction=True)
def test_dedup_forget_lets_a_consumed_message_run_again(any_backend):
    from dedup_celery.signals import message_forgotten
    from tests.helpers import captured

    made = claim_on(any_backend, "done", 60)
    any_backend.complete(made, None)
    out = io.StringIO()
    with captured(message_forgotten) as sent:
        call_command("dedup_forget", "cmd", "done", "--noinput", stdout=out)
    assert "Forgotten" in out.getvalue()
    assert any_backend.get("cmd", made.key_digest) is None
    assert [(s["scope"], s["key_digest"], s["owner"]) for s in sent] == [
        ("cmd", made.key_digest, made.owner)
    ]


@pytest.mark.django_db(transaction=True)
def test_dedup_forget_refuses_an_unfinished_record_or_a_changed_owner(any_backend):
    made = claim_on(any_backend, "running", 60)
    with pytest.raises(CommandError, match=r"processing.*dedup_release"):
        call_command("dedup_forget", "cmd", "running", "--noinput", stdout=io.StringIO())
    any_backend.complete(made, None)
    with pytest.raises(CommandError, match="not the one given with --owner"):
        call_command(
            "dedup_forget", "cmd", "running", "--noinput", "--owner", uuid.uuid4().hex,
            stdout=io.StringIO(),
        )  # fmt: skip
    assert any_backend.get("cmd", made.key_digest) is not None


@pytest.mark.django_db(transaction=True)
def test_dedup_forget_asks_before_it_deletes(any_backend, monkeypatch):
    made = claim_on(any_backend, "done", 60)
    any_backend.complete(made, None)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    with pytest.raises(CommandError, match="Not forgotten"):
        call_command("dedup_forget", "cmd", "done", stdout=io.StringIO())
    assert any_backend.get("cmd", made.key_digest) is not None
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    call_command("dedup_forget", "cmd", "done", stdout=io.StringIO())
    assert any_backend.get("cmd", made.key_digest) is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("command", ["dedup_release", "dedup_forget"])
def test_a_bad_owner_is_a_command_error(any_backend, command):
    claim_on(any_backend, "k", 60)
    with pytest.raises(CommandError, match=r"--owner .*32 hex"):
        call_command(command, "cmd", "k", "--owner", "not-a-token", stdout=io.StringIO())


@pytest.mark.django_db(transaction=True)
def test_no_record_hints_at_the_task_s_dotted_name(any_backend):
    with pytest.raises(CommandError, match="scope is the task's dotted name"):
        call_command("dedup_inspect", "ship_order", "order:1")


@pytest.mark.django_db(transaction=True)
def test_inspect_prints_only_the_fields_that_apply(any_backend):
    made = claim_on(any_backend, "done", 60)
    out = io.StringIO()
    call_command("dedup_inspect", "cmd", "done", stdout=out)
    assert "lease_expired" in out.getvalue()
    any_backend.complete(made, None)
    out = io.StringIO()
    call_command("dedup_inspect", "cmd", "done", stdout=out)
    printed = out.getvalue()
    assert "lease_expired" not in printed
    assert "heartbeat_at" not in printed  # never set on this record
    assert f"owner: {made.owner}" in printed


@pytest.mark.parametrize(
    "command", ["dedup_inspect", "dedup_release", "dedup_forget", "dedup_purge"]
)
def test_operator_commands_run_no_unrelated_system_checks(command):
    from django.core.management import load_command_class

    assert load_command_class("dedup_celery", command).requires_system_checks == []


@pytest.mark.django_db(transaction=True)
def test_dedup_inspect_lists_records_as_text_or_json(any_backend):
    import json

    done = claim_on(any_backend, "done", 60)
    any_backend.complete(done, None)
    running = claim_on(any_backend, "running", 60)
    out = io.StringIO()
    call_command("dedup_inspect", stdout=out)
    text = out.getvalue()
    assert "2 record(s)" in text
    assert running.owner in text
    assert done.owner in text
    out = io.StringIO()
    call_command("dedup_inspect", "--status", "processing", "--json", stdout=out)
    listing = json.loads(out.getvalue())
    assert [r["key"] for r in listing["records"]] == ["running"]
    assert listing["records"][0]["lease_expired"] is False
    out = io.StringIO()
    call_command("dedup_inspect", "cmd", "done", "--json", stdout=out)
    assert "lease_expired" not in json.loads(out.getvalue())
    out = io.StringIO()
    call_command("dedup_inspect", "--limit", "1", stdout=out)
    assert "More may match" in out.getvalue()
    out = io.StringIO()
    call_command("dedup_inspect", "--older-than", "1h", stdout=out)
    assert "0 record(s)" in out.getvalue()
    with pytest.raises(CommandError, match="'soon' is not an age"):
        call_command("dedup_inspect", "--older-than", "soon")
    with pytest.raises(CommandError, match="give SCOPE and KEY"):
        call_command("dedup_inspect", "--digest")


@pytest.mark.django_db(transaction=True)
def test_a_redis_listing_says_when_its_scan_stopped(settings, redis_url):
    from dedup_celery.backends.base import RecordFilter

    settings.DEDUP_CELERY = {
        "BACKEND": "redis",
        "OPTIONS": {"url": f"{redis_url}/6", "key_prefix": f"cmd:{uuid.uuid4().hex[:8]}:"},
    }
    backend = get_backend()
    for key in ("a", "b", "c"):
        claim_on(backend, key, 60)
    cut = backend.list_records(RecordFilter(), scan_limit=2, batch=1)
    assert (len(cut.records), cut.scanned, cut.complete) == (2, 2, False)
    whole = backend.list_records(RecordFilter(), batch=2)
    assert (len(whole.records), whole.scanned, whole.complete) == (3, 3, True)
