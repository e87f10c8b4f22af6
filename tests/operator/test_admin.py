"""The admin: a read-only changelist with filters and search, and the release action."""

from __future__ import annotations

import re
import time

import pytest
from django.contrib.auth.models import Permission, User
from django_celery_results.models import TaskResult

from dedup_celery import get_backend, signals
from dedup_celery.models import DedupRecord
from tests.helpers import captured, claim_for, hold

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/admin/dedup_celery/deduprecord/"


def claim(key, *, lease=60.0, owner=None):
    return hold("admin.task", key, task_id=f"tid-{key}", owner=owner, lease=lease, ttl=3600)


def consumed(key):
    made = claim(key)
    get_backend().complete(made, None)
    return made


def test_changelist_renders_records_with_filters_and_search(admin_client):
    claim("processing-key")
    consumed("consumed-key")
    page = admin_client.get(URL)
    assert page.status_code == 200
    body = page.content.decode()
    assert "processing-key" in body
    assert "consumed-key" in body
    filtered = admin_client.get(URL, {"status__exact": "processing"}).content.decode()
    assert "processing-key" in filtered
    assert "consumed-key" not in filtered
    searched = admin_client.get(URL, {"q": "tid-consumed-key"}).content.decode()
    assert "consumed-key" in searched
    assert "processing-key" not in searched


def test_detail_is_read_only_and_links_the_task_result(admin_client):
    made = consumed("linked")
    TaskResult.objects.create(task_id=made.task_id, status="SUCCESS")
    pk = DedupRecord.objects.get(key="linked").pk
    page = admin_client.get(f"{URL}{pk}/change/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "/admin/django_celery_results/taskresult/" in body
    assert 'name="_save"' not in body
    assert admin_client.get(f"{URL}add/").status_code == 403


def test_detail_links_the_results_of_both_runs(admin_client):
    made = consumed("both-runs")
    original = TaskResult.objects.create(task_id=made.task_id, status="SUCCESS")
    duplicate_id = "tid-the-duplicate"
    get_backend().claim(claim_for("admin.task", "both-runs", task_id=duplicate_id))
    copy = TaskResult.objects.create(task_id=duplicate_id, status="SUCCESS")
    pk = DedupRecord.objects.get(key="both-runs").pk
    body = admin_client.get(f"{URL}{pk}/change/").content.decode()
    assert duplicate_id in body
    for row in (original, copy):
        assert f"/admin/django_celery_results/taskresult/{row.pk}/change/" in body


def select(client, records, **extra):
    data = {
        "action": "release_records",
        "_selected_action": [DedupRecord.objects.get(key=r.key).pk for r in records],
        **extra,
    }
    return client.post(URL, data, follow=True)


def confirm(client, records, owners, *, force=False):
    data = {"confirm": "yes"}
    for made, owner in zip(records, owners, strict=True):
        data[f"owner-{DedupRecord.objects.get(key=made.key).pk}"] = owner
    if force:
        data["force"] = "on"
    return select(client, records, **data)


def test_release_asks_for_confirmation_showing_the_owner(admin_client):
    made = claim("ask", lease=0.2)
    page = select(admin_client, [made])
    assert page.status_code == 200
    body = page.content.decode()
    assert made.owner in body
    assert "release-records" in body
    assert DedupRecord.objects.filter(key="ask").exists()


def test_release_deletes_an_expired_lease_of_the_owner_shown(admin_client):
    made = claim("expired", lease=0.2)
    time.sleep(0.4)
    with captured(signals.message_released) as released:
        page = confirm(admin_client, [made], [made.owner])
    assert "1 record(s) released" in page.content.decode()
    assert not DedupRecord.objects.filter(key="expired").exists()
    assert released[0]["reason"] == "operator"


def test_release_refuses_a_live_lease_unless_forced(admin_client):
    made = claim("live", lease=60)
    page = confirm(admin_client, [made], [made.owner])
    assert "not released" in page.content.decode()
    assert DedupRecord.objects.filter(key="live").exists()
    confirm(admin_client, [made], [made.owner], force=True)
    assert not DedupRecord.objects.filter(key="live").exists()


def test_release_refuses_when_the_owner_changed_since_the_page(admin_client):
    stale = claim("retaken", lease=0.2)
    time.sleep(0.4)
    claim("retaken", lease=60)  # another delivery took the expired lease over
    page = confirm(admin_client, [stale], [stale.owner], force=True)
    assert "not released" in page.content.decode()
    assert DedupRecord.objects.get(key="retaken").owner.hex != stale.owner


def test_release_never_touches_a_consumed_record(admin_client):
    made = consumed("done")
    confirm(admin_client, [made], [made.owner], force=True)
    assert DedupRecord.objects.get(key="done").status == DedupRecord.Status.CONSUMED


def test_release_needs_the_release_permission(client):
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_deduprecord"))
    client.force_login(viewer)
    made = claim("guarded", lease=0.2)
    time.sleep(0.4)
    page = client.get(URL)
    assert page.status_code == 200
    assert "release_records" not in page.content.decode()
    confirm(client, [made], [made.owner], force=True)
    assert DedupRecord.objects.filter(key="guarded").exists()

    viewer.user_permissions.add(Permission.objects.get(codename="release_deduprecord"))
    viewer = User.objects.get(pk=viewer.pk)
    client.force_login(viewer)
    assert "release_records" in client.get(URL).content.decode()
    confirm(client, [made], [made.owner])
    assert not DedupRecord.objects.filter(key="guarded").exists()


@pytest.mark.django_db(transaction=True, databases=["default", "sqlite"])
def test_the_admin_lists_and_releases_in_the_database_the_backend_writes_to(admin_client, settings):
    """With DATABASE set and no router, the admin reads and releases that alias, not default."""
    settings.DEDUP_CELERY = {"DATABASE": "sqlite", "RETRY_COUNTDOWN": 1}
    made = claim("in-sqlite", lease=0.2)
    in_sqlite = DedupRecord.objects.using("sqlite")
    assert in_sqlite.filter(key="in-sqlite").exists()
    assert not DedupRecord.objects.using("default").filter(key="in-sqlite").exists()
    assert "in-sqlite" in admin_client.get(URL).content.decode()
    time.sleep(0.4)
    pk = in_sqlite.get(key="in-sqlite").pk
    page = admin_client.post(
        URL,
        {"action": "release_records", "_selected_action": [pk], "confirm": "yes",
         f"owner-{pk}": made.owner},
        follow=True,
    )  # fmt: skip
    assert "1 record(s) released" in page.content.decode()
    assert not in_sqlite.filter(key="in-sqlite").exists()


def forget(client, records, owners=None):
    data = {"action": "forget_records", "_selected_action": [], "confirm": "yes"}
    for made in records:
        pk = DedupRecord.objects.get(key=made.key).pk
        data["_selected_action"].append(pk)
        if owners is not None:
            data[f"owner-{pk}"] = owners[made.key]
    if owners is None:
        del data["confirm"]
    return client.post(URL, data, follow=True)


def test_forget_asks_for_confirmation_then_deletes_a_consumed_record(admin_client):
    made = consumed("again")
    page = forget(admin_client, [made])
    assert made.owner in page.content.decode()
    assert "forget-records" in page.content.decode()
    assert DedupRecord.objects.filter(key="again").exists()
    with captured(signals.message_forgotten) as sent:
        page = forget(admin_client, [made], {"again": made.owner})
    assert "1 record(s) forgotten" in page.content.decode()
    assert not DedupRecord.objects.filter(key="again").exists()
    assert [s["owner"] for s in sent] == [made.owner]


def test_forget_gives_each_reason_for_a_record_it_keeps(admin_client):
    running = claim("running")
    retaken = consumed("retaken")
    page = forget(admin_client, [running, retaken], {"running": running.owner, "retaken": "0" * 32})
    body = page.content.decode()
    assert "1 record(s) not forgotten: still processing" in body
    assert "1 record(s) not forgotten: the owner changed" in body
    assert DedupRecord.objects.filter(key__in=["running", "retaken"]).count() == 2


def test_forget_needs_the_forget_permission(client):
    viewer = User.objects.create_user("viewer2", password="pw", is_staff=True)
    viewer.user_permissions.add(
        Permission.objects.get(codename="view_deduprecord"),
        Permission.objects.get(codename="release_deduprecord"),
    )
    client.force_login(viewer)
    made = consumed("guarded-forget")
    assert "forget_records" not in client.get(URL).content.decode()
    forget(client, [made], {"guarded-forget": made.owner})
    assert DedupRecord.objects.filter(key="guarded-forget").exists()
    viewer.user_permissions.add(Permission.objects.get(codename="forget_deduprecord"))
    client.force_login(User.objects.get(pk=viewer.pk))
    forget(client, [made], {"guarded-forget": made.owner})
    assert not DedupRecord.objects.filter(key="guarded-forget").exists()


def test_release_gives_each_reason_for_a_record_it_keeps(admin_client):
    live = claim("still-live", lease=600)
    done = consumed("already-done")
    stale = claim("taken-over", lease=0.2)
    time.sleep(0.4)
    claim("taken-over", lease=60)  # another delivery took the expired lease over
    page = confirm(admin_client, [live, done, stale], [live.owner, done.owner, stale.owner])
    body = page.content.decode()
    assert "1 record(s) not released: its lease is live" in body
    assert "1 record(s) not released: consumed or failed: forget it instead" in body
    assert "1 record(s) not released: the owner changed since the page was shown" in body


def test_the_detail_page_groups_every_column_once():
    from dedup_celery.admin.records import FIELDSETS, SHOWN_AS
    from dedup_celery.backends.base import RECORD_FIELDS

    shown = [name for _title, group in FIELDSETS for name in group["fields"]]
    assert len(shown) == len(set(shown))
    columns = {SHOWN_AS.get(column, column) for column in RECORD_FIELDS}
    assert columns - set(shown) == set()
    titles = [str(title) for title, _group in FIELDSETS]
    assert titles == ["Message", "Ownership and lease", "Duplicates and takeovers", "Result"]


def test_the_changelist_shows_badges_short_keys_and_the_lease_in_words(admin_client):
    long_key = "order-" + "x" * 80
    hold("shop.tasks.place_order", long_key, lease=600, ttl=3600)
    stuck = claim("stuck", lease=0.2)
    time.sleep(1.2)
    body = admin_client.get(URL).content.decode()
    assert '<span class="dedup-badge dedup-badge--processing"' in body
    (cell,) = [
        c for c in re.findall(r'<th class="field-message">(.*?)</th>', body) if "order-" in c
    ]
    assert f'title="{long_key}"' in cell  # the whole key on hover
    assert long_key not in cell.replace(f'title="{long_key}"', "")  # and only there
    assert "order-xxxxxxxxxxxxxxxxxxx…" in cell
    assert "minutes left" in body  # the 600 s lease
    assert "expired 1 second ago" in body
    assert "dedup_celery/admin.css" in body
    assert stuck.key in body


def test_the_scope_column_and_filter_appear_only_when_a_scope_is_not_its_task(admin_client):
    claim("plain-scope")
    body = admin_client.get(URL).content.decode()
    assert "column-short_scope" not in body
    assert "?scope=" not in body
    hold("admin.task", "shared", scope="shared-orders", lease=60)
    body = admin_client.get(URL).content.decode()
    assert "column-short_scope" in body
    assert "?scope=shared-orders" in body


def test_the_lease_and_duplicate_filters_and_the_date_hierarchy(admin_client):
    stuck = claim("stuck-one", lease=0.2)
    running = claim("running-one", lease=600)
    done = consumed("duplicated-one")
    get_backend().claim(claim_for("admin.task", "duplicated-one", task_id="a-copy"))
    time.sleep(0.4)
    expired = admin_client.get(URL, {"lease": "expired"}).content.decode()
    assert stuck.key in expired
    assert running.key not in expired
    live = admin_client.get(URL, {"lease": "live"}).content.decode()
    assert (running.key in live, stuck.key in live) == (True, False)
    met = admin_client.get(URL, {"duplicates": "some"}).content.decode()
    assert (done.key in met, running.key in met) == (True, False)
    today = DedupRecord.objects.get(key="stuck-one").created_at
    page = admin_client.get(URL, {"created_at__year": today.year})
    assert page.status_code == 200
    assert stuck.key in page.content.decode()
    assert 'class="toplinks"' in admin_client.get(URL).content.decode()  # the date hierarchy


def test_payload_mismatches_show_in_red_in_the_list_and_have_a_filter(admin_client):
    other = consumed("other-arguments")
    plain = consumed("same-arguments")
    get_backend().count_payload_mismatch(other.scope, other.key_digest)
    listed = admin_client.get(URL).content.decode()
    assert '<span class="dedup-mismatch">1 payload mismatch</span>' in listed
    shown = admin_client.get(URL, {"duplicates": "mismatch"}).content.decode()
    assert (other.key in shown, plain.key in shown) == (True, False)
    pk = DedupRecord.objects.get(key="other-arguments").pk
    detail = admin_client.get(f"{URL}{pk}/change/").content.decode()
    assert "Payload mismatches" in detail


OVERVIEW = f"{URL}overview/"


def test_the_overview_sums_each_task_and_charts_its_records_per_hour(admin_client):
    for n in range(3):
        made = hold("shop.ship", f"ship-{n}", lease=600, ttl=3600)
        if n:
            get_backend().complete(made, None)
    get_backend().claim(claim_for("shop.ship", "ship-1", task_id="a-copy"))
    poisoned = hold("shop.pay", "pay-1", lease=0.1, ttl=3600, cap=0)
    time.sleep(0.2)
    get_backend().claim(claim_for("shop.pay", "pay-1", cap=0))  # the takeover poisons it
    assert DedupRecord.objects.get(key=poisoned.key).status == "poisoned"
    page = admin_client.get(OVERVIEW)
    assert page.status_code == 200
    rows = {summary.task_name: summary for summary in page.context["summaries"]}
    ship, pay = rows["shop.ship"], rows["shop.pay"]
    assert (ship.total, ship.by_status["consumed"], ship.by_status["processing"]) == (3, 2, 1)
    assert ship.skipped == 1
    assert ship.oldest_processing is not None
    assert pay.by_status["poisoned"] == 1
    assert page.context["total"].total == 4
    # Every record was made this hour: the last of the 24 bars is the tallest.
    assert ship.per_hour == [0] * 23 + [3]
    assert ship.bars[-1]["height"] == 40
    assert ship.bars[0]["height"] == 0
    body = page.content.decode()
    assert body.count("<rect ") == 24 * 3  # two tasks and the total
    assert "status__exact=poisoned" in body  # poisoned records link to their releasable list
    assert "releasable" in body
    assert "<script" not in body.split('id="dedup-overview"')[1]


def test_the_overview_is_linked_from_the_changelist_and_needs_the_view_permission(client):
    staff = User.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(staff)
    assert client.get(OVERVIEW).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_deduprecord"))
    client.force_login(User.objects.get(pk=staff.pk))
    assert client.get(OVERVIEW).status_code == 200
    assert 'href="/admin/dedup_celery/deduprecord/overview/"' in client.get(URL).content.decode()
    assert "The message table is empty" in client.get(OVERVIEW).content.decode()


def test_the_overview_and_the_list_work_without_time_zones(admin_client, settings):
    settings.USE_TZ = False
    claim("naive-one", lease=600)
    assert admin_client.get(URL).status_code == 200
    page = admin_client.get(OVERVIEW)
    assert page.status_code == 200
    (summary,) = page.context["summaries"]
    assert summary.per_hour[-1] == 1
    assert summary.oldest_age.endswith("seconds")


@pytest.mark.django_db(transaction=True, databases=["default", "mysql"])
def test_on_mariadb_the_date_hierarchy_appears_only_where_it_needs_no_time_zone_tables(
    admin_client, settings
):
    settings.DEDUP_CELERY = {"DATABASE": "mysql", "RETRY_COUNTDOWN": 1}
    claim("in-mariadb", lease=600)
    assert 'class="toplinks"' in admin_client.get(URL).content.decode()  # UTC: no conversion
    settings.TIME_ZONE = "Europe/Berlin"  # the throwaway server has no time zone tables
    page = admin_client.get(URL)
    assert page.status_code == 200
    assert "in-mariadb" in page.content.decode()
    assert 'class="toplinks"' not in page.content.decode()
    assert admin_client.get(OVERVIEW).status_code == 200
