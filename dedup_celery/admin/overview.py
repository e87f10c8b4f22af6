"""The overview page: the message table summed per task name, with records per hour.

Operators would rather look than read: each task gets its records by status
as a stacked bar, its duplicates and takeovers, its oldest PROCESSING record,
and a bar chart of records per hour over the last day. Plain HTML and SVG,
no JavaScript. It reads the whole table (no index serves a sum per task), so
on a very large table it is a slow page, not a slow claim.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from django.db.models import Count, Min, Q, Sum
from django.db.models.functions import TruncHour
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from dedup_celery.admin import display
from dedup_celery.states import Status

#: Hours shown in the charts, oldest first.
HOURS = 24
#: The chart's size in SVG units; bars share the width.
CHART_WIDTH, CHART_HEIGHT = 240, 40


@dataclass
class TaskSummary:
    """One task name's records, summed."""

    task_name: str
    total: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    rescheduled: int = 0
    takeovers: int = 0
    oldest_processing: datetime.datetime | None = None
    per_hour: list[int] = field(default_factory=lambda: [0] * HOURS)
    #: What the page adds: the changelist filtered to this task, its bars, the oldest's age.
    links: dict[str, str] = field(default_factory=dict)
    bars: list[dict[str, Any]] = field(default_factory=list)
    oldest_age: str = display.EMPTY
    label: str = ""

    @property
    def segments(self) -> list[dict[str, Any]]:
        """The stacked bar: one segment per status present, as a share of the total."""
        return [
            {"status": status, "count": count, "percent": round(100 * count / self.total, 1)}
            for status, count in self.by_status.items()
            if count and self.total
        ]


def window_start(now: datetime.datetime) -> datetime.datetime:
    """The first hour the charts show: the current hour and the HOURS - 1 before it."""
    return now.replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=HOURS - 1)


def _bars(counts: list[int], start: datetime.datetime) -> list[dict[str, Any]]:
    """SVG rectangles for *counts*, one per hour from *start*, scaled to the largest."""
    tallest = max(counts, default=0) or 1
    width = CHART_WIDTH / len(counts)
    bars = []
    for index, count in enumerate(counts):
        height = round(CHART_HEIGHT * count / tallest, 2)
        hour = start + datetime.timedelta(hours=index)
        bars.append(
            {
                "x": round(index * width, 2),
                "y": round(CHART_HEIGHT - height, 2),
                "width": round(width * 0.8, 2),
                "height": height,
                "label": _("%(hour)s UTC: %(count)d record(s)")
                % {"hour": hour.strftime("%d %b %H:00"), "count": count},
            }
        )
    return bars


def summarize(rows: Any, now: datetime.datetime) -> tuple[list[TaskSummary], TaskSummary]:
    """Sum *rows* (the admin's queryset) per task name; return the summaries and their total."""
    statuses = [status.value for status in Status]
    sums = (
        rows.order_by()
        .values("task_name")
        .annotate(
            total=Count("pk"),
            skipped_sum=Sum("skipped"),
            rescheduled_sum=Sum("rescheduled"),
            takeovers_sum=Sum("takeovers"),
            oldest_processing=Min("created_at", filter=Q(status=Status.PROCESSING)),
            **{f"n_{status}": Count("pk", filter=Q(status=status)) for status in statuses},
        )
        .order_by("task_name")
    )
    summaries = {}
    for row in sums:
        summaries[row["task_name"]] = TaskSummary(
            task_name=row["task_name"],
            total=row["total"],
            by_status={status: row[f"n_{status}"] for status in statuses},
            skipped=row["skipped_sum"] or 0,
            rescheduled=row["rescheduled_sum"] or 0,
            takeovers=row["takeovers_sum"] or 0,
            oldest_processing=row["oldest_processing"],
        )
    start = window_start(now)
    hourly = (
        rows.order_by()
        .filter(created_at__gte=start)
        .annotate(hour=TruncHour("created_at", tzinfo=datetime.timezone.utc))
        .values("task_name", "hour")
        .annotate(count=Count("pk"))
    )
    for row in hourly:
        summary = summaries.get(row["task_name"])
        index = int((row["hour"] - start).total_seconds() // 3600)
        if summary is not None and 0 <= index < HOURS:
            summary.per_hour[index] += row["count"]
    total = TaskSummary(task_name=str(_("All tasks")))
    total.by_status = dict.fromkeys(statuses, 0)
    for summary in summaries.values():
        total.total += summary.total
        total.skipped += summary.skipped
        total.rescheduled += summary.rescheduled
        total.takeovers += summary.takeovers
        for status, count in summary.by_status.items():
            total.by_status[status] += count
        total.per_hour = [a + b for a, b in zip(total.per_hour, summary.per_hour, strict=True)]
        if summary.oldest_processing and (
            total.oldest_processing is None or summary.oldest_processing < total.oldest_processing
        ):
            total.oldest_processing = summary.oldest_processing
    return list(summaries.values()), total


def overview_view(model_admin: Any, request: HttpRequest) -> TemplateResponse:
    """The overview page of the message table, for staff who may view records."""
    from django.core.exceptions import PermissionDenied

    if not model_admin.has_view_or_change_permission(request):
        raise PermissionDenied
    rows = model_admin.get_queryset(request)
    # The database's clock, which wrote every time on the records (aware or naive as
    # USE_TZ says); the web server's only when the table is empty.
    now = rows.values_list("store_now", flat=True).first() or timezone.now()
    summaries, total = summarize(rows, now)
    changelist = reverse("admin:dedup_celery_deduprecord_changelist")
    start = window_start(now)
    for summary in [*summaries, total]:
        query = {"task_name__exact": summary.task_name} if summary is not total else {}
        summary.links = {
            "all": f"{changelist}?{urlencode(query)}",
            "poisoned": f"{changelist}?{urlencode({**query, 'status__exact': 'poisoned'})}",
            "stuck": f"{changelist}?{urlencode({**query, 'lease': 'expired'})}",
            "processing": f"{changelist}?{urlencode({**query, 'status__exact': 'processing'})}",
        }
        summary.label = display.dotted(summary.task_name)
        summary.bars = _bars(summary.per_hour, start)
        summary.oldest_age = display.age(summary.oldest_processing, now)
    context = {
        **model_admin.admin_site.each_context(request),
        "title": _("Message table overview"),
        "opts": model_admin.opts,
        "summaries": summaries,
        "total": total,
        "statuses": [(status.value, status.label) for status in Status],
        "chart": {"width": CHART_WIDTH, "height": CHART_HEIGHT, "hours": HOURS},
        "empty": display.EMPTY,
    }
    return TemplateResponse(request, "admin/dedup_celery/deduprecord/overview.html", context)
