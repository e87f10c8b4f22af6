"""How the admin shows a record: status badges, short keys, durations in words, result links.

Every empty value is the admin's one placeholder (:data:`EMPTY`), so a blank
cell always looks the same.
"""

from __future__ import annotations

import datetime

from django.apps import apps
from django.urls import NoReverseMatch, reverse
from django.utils.functional import Promise
from django.utils.html import conditional_escape, format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from django.utils.timesince import timesince
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from dedup_celery.states import Status

#: Text, or text translated when it is rendered (``gettext_lazy``).
StrOrPromise = str | Promise

#: The placeholder of an empty value, in every column and field.
EMPTY = "—"

#: What each status means to an operator, shown when the badge is hovered.
STATUS_HINTS: dict[str, StrOrPromise] = {
    Status.PROCESSING: gettext_lazy("a delivery holds the message; copies are rescheduled"),
    Status.CONSUMED: gettext_lazy("done; duplicates are skipped until the record expires"),
    Status.FAILED: gettext_lazy("the body raised; a retry or a new task id runs it again"),
    Status.POISONED: gettext_lazy("deliveries kept dying; releasable once the cause is fixed"),
    Status.QUEUED: gettext_lazy(
        "published, not yet claimed; other sends are answered until the queue TTL ends"
    ),
}


def badge(status: str) -> SafeString:
    """The status as a coloured badge (CSS classes of ``dedup_celery/admin.css``)."""
    label = Status(status).label if status in Status.values else status
    hint = STATUS_HINTS.get(status, "")
    return format_html(
        '<span class="dedup-badge dedup-badge--{}" title="{}">{}</span>', status, hint, label
    )


def shortened(text: str, limit: int, *, keep_end: bool = False) -> SafeString:
    """*text* cut to *limit* characters with an ellipsis, the whole of it on hover."""
    if len(text) <= limit:
        return format_html("{}", text)
    cut = "…" + text[-(limit - 1) :] if keep_end else text[: limit - 1] + "…"
    return format_html('<span title="{}">{}</span>', text, cut)


def dotted(name: str) -> SafeString:
    """A dotted name that may wrap after each dot, and nowhere else."""
    return mark_safe(".<wbr>".join(conditional_escape(part) for part in name.split(".")))


def message(task_name: str, key: str) -> SafeString:
    """The record's key, cut short, above its task's dotted name (its end kept)."""
    return format_html(
        '<span class="dedup-key">{}</span><br><span class="dedup-task">{}</span>',
        shortened(key, 26),
        shortened(task_name, 34, keep_end=True),
    )


def counters(
    skipped: int, rescheduled: int, takeovers: int, payload_mismatches: int = 0
) -> SafeString | str:
    """The duplicate counters that are not zero, one per line (a payload mismatch in red)."""
    lines = [
        ngettext("%(count)d skipped", "%(count)d skipped", skipped) % {"count": skipped}
        if skipped
        else "",
        ngettext("%(count)d rescheduled", "%(count)d rescheduled", rescheduled)
        % {"count": rescheduled}
        if rescheduled
        else "",
        ngettext("%(count)d takeover", "%(count)d takeovers", takeovers) % {"count": takeovers}
        if takeovers
        else "",
    ]
    shown = [format_html("{}", line) for line in lines if line]
    if payload_mismatches:
        text = ngettext(
            "%(count)d payload mismatch", "%(count)d payload mismatches", payload_mismatches
        ) % {"count": payload_mismatches}
        shown.append(format_html('<span class="dedup-mismatch">{}</span>', text))
    if not shown:
        return EMPTY
    return format_html_join(mark_safe("<br>"), "{}", ((line,) for line in shown))


def in_words(seconds: float) -> str:
    """A duration as an operator reads it: "40 seconds", "4 minutes", "2 days"."""
    seconds = abs(seconds)
    if seconds < 60:
        count = int(seconds)
        return ngettext("%(count)d second", "%(count)d seconds", count) % {"count": count}
    now = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
    return timesince(now - datetime.timedelta(seconds=seconds), now, depth=1)


def lease_left(
    status: str, expires_at: datetime.datetime | None, now: datetime.datetime | None
) -> SafeString | str:
    """The time left on a PROCESSING record's lease, or how long ago it expired."""
    if status != Status.PROCESSING or expires_at is None or now is None:
        return EMPTY
    left = (expires_at - now).total_seconds()
    if left >= 0:
        return _("%(duration)s left") % {"duration": in_words(left)}
    return format_html(
        '<span class="dedup-expired">{}</span>',
        _("expired %(duration)s ago") % {"duration": in_words(left)},
    )


def age(created_at: datetime.datetime | None, now: datetime.datetime | None) -> str:
    """How old a record is, in words."""
    if created_at is None or now is None:
        return EMPTY
    return in_words((now - created_at).total_seconds())


def result_link(task_id: str | None) -> SafeString | str:
    """A link to django-celery-results' row of *task_id*, its status, or why there is none."""
    if not task_id or not apps.is_installed("django_celery_results"):
        return EMPTY
    task_result_model = apps.get_model("django_celery_results", "TaskResult")
    found = task_result_model._default_manager.filter(task_id=task_id).first()
    if found is None:
        return _("no stored result")
    try:
        url = reverse("admin:django_celery_results_taskresult_change", args=[found.pk])
    except NoReverseMatch:
        return str(found.status)
    return format_html('<a href="{}">{}</a>', url, found.status)
