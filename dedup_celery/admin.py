"""Admin for the message table: read-only, plus release and forget actions through the backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from django.apps import apps
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from dedup_celery.backends.base import RECORD_FIELDS
from dedup_celery.backends.db import message_table_alias
from dedup_celery.conf import get_settings
from dedup_celery.exceptions import StorageError
from dedup_celery.managers import DedupRecordQuerySet
from dedup_celery.models import DedupRecord
from dedup_celery.operator import forget_record, release_record
from dedup_celery.states import FORGETTABLE, RELEASABLE

RELEASE_PERMISSION = "dedup_celery.release_deduprecord"
FORGET_PERMISSION = "dedup_celery.forget_deduprecord"

# Every column, in the table's order, with the lease and both runs' task results beside them.
_BESIDE: dict[str, tuple[str, ...]] = {
    "status": ("status", "lease"),
    "task_id": ("task_id", "task_result"),
    "last_duplicate_task_id": ("last_duplicate_task_id", "last_duplicate_result"),
}
DETAIL_FIELDS: tuple[str, ...] = tuple(
    name for column in RECORD_FIELDS for name in _BESIDE.get(column, (column,))
)

if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[DedupRecord]
else:
    _ModelAdmin = admin.ModelAdmin  # not subscriptable at run time


@admin.register(DedupRecord)
class DedupRecordAdmin(_ModelAdmin):
    """Lists message records; only the release and forget actions change anything."""

    list_display = (
        "scope",
        "key",
        "status",
        "lease",
        "task_name",
        "task_id",
        "attempt",
        "skipped",
        "rescheduled",
        "takeovers",
        "created_at",
        "expires_at",
    )
    list_filter = ("status", "task_name", "scope")
    search_fields = ("key", "task_id", "=key_digest")
    ordering = ("-created_at",)
    actions = ("release_records", "forget_records")
    list_per_page = 100
    show_full_result_count = False
    fields = DETAIL_FIELDS
    readonly_fields = DETAIL_FIELDS

    def get_queryset(self, request: HttpRequest) -> QuerySet[DedupRecord]:
        """Read the database the backend writes to, with each lease judged by its clock."""
        alias = message_table_alias(get_settings().database)
        rows = cast(DedupRecordQuerySet, super().get_queryset(request).using(alias))
        return rows.with_lease_expired()

    @admin.display(description=_("lease"))
    def lease(self, obj: DedupRecord) -> str:
        """Say whether a PROCESSING record's lease is live or expired."""
        expired = getattr(obj, "lease_expired", None)
        if obj.status != DedupRecord.Status.PROCESSING:
            return str(_("expired")) if expired else "—"
        return str(_("expired") if expired else _("live"))

    @admin.display(description=_("task result"))
    def task_result(self, obj: DedupRecord) -> str:
        """Link to the consuming task's result, when django-celery-results is installed."""
        return _result_link(obj.task_id)

    @admin.display(description=_("last duplicate's result"))
    def last_duplicate_result(self, obj: DedupRecord) -> str:
        """Link to the latest duplicate's own result row (its meta names the original)."""
        return _result_link(obj.last_duplicate_task_id) if obj.last_duplicate_task_id else "—"

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Records are only written by tasks."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Records are read-only here; releasing is an action."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Deleting bypasses the owner check; use the release action or dedup_purge."""
        return False

    def has_release_permission(self, request: HttpRequest) -> bool:
        """Only users with ``dedup_celery.release_deduprecord`` may release."""
        return request.user.has_perm(RELEASE_PERMISSION)

    def _confirmation(
        self,
        request: HttpRequest,
        records: list[DedupRecord],
        action: str,
        title: Any,
        **extra: Any,
    ) -> TemplateResponse:
        """The page that shows *records* with their owners before *action* changes them."""
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "records": records,
            "action": f"{action}_records",
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            **extra,
        }
        template = f"admin/dedup_celery/deduprecord/{action}_confirmation.html"
        return TemplateResponse(request, template, context)

    def has_forget_permission(self, request: HttpRequest) -> bool:
        """Only users with ``dedup_celery.forget_deduprecord`` may forget."""
        return request.user.has_perm(FORGET_PERMISSION)

    @admin.action(
        description=_("Forget selected consumed or failed records (their messages may run again)"),
        permissions=["forget"],
    )
    def forget_records(self, request: HttpRequest, queryset: QuerySet[DedupRecord]) -> Any:
        """Ask for confirmation, then compare-and-delete each finished record against its owner."""
        records = list(queryset.order_by("pk"))
        if request.POST.get("confirm") != "yes":
            return self._confirmation(
                request, records, "forget", _("Forget message records"), forgettable=FORGETTABLE
            )
        forgotten = 0
        kept: dict[str, int] = {}
        for record in records:
            shown_owner = request.POST.get(f"owner-{record.pk}", "")
            if record.status not in FORGETTABLE:
                reason = str(
                    _("poisoned: release it instead")
                    if record.status == DedupRecord.Status.POISONED
                    else _("still processing")
                )
            elif not shown_owner:
                reason = str(_("no owner was shown for it"))
            else:
                try:
                    ok = forget_record(record.scope, record.key_digest, shown_owner)
                except (StorageError, ValueError) as exc:
                    self.message_user(request, f"{record}: {exc}", messages.ERROR)
                    continue
                if ok:
                    forgotten += 1
                    continue
                reason = str(_("the owner changed since the page was shown"))
            kept[reason] = kept.get(reason, 0) + 1
        if forgotten:
            self.message_user(
                request,
                _(
                    "%(count)d record(s) forgotten. Nothing was re-sent: the next delivery of "
                    "each message runs its body again."
                )
                % {"count": forgotten},
                messages.SUCCESS,
            )
        for reason, count in kept.items():
            self.message_user(
                request,
                _("%(count)d record(s) not forgotten: %(reason)s.")
                % {"count": count, "reason": reason},
                messages.WARNING,
            )
        return None

    @admin.action(
        description=_("Release selected processing or poisoned records"), permissions=["release"]
    )
    def release_records(self, request: HttpRequest, queryset: QuerySet[DedupRecord]) -> Any:
        """Ask for confirmation, then compare-and-delete each record against the shown owner."""
        records = list(queryset.order_by("pk"))
        if request.POST.get("confirm") != "yes":
            return self._confirmation(
                request,
                records,
                "release",
                _("Release message records"),
                processing=DedupRecord.Status.PROCESSING,
                poisoned=DedupRecord.Status.POISONED,
            )
        force = request.POST.get("force") == "on"
        released = refused = 0
        for record in records:
            shown_owner = request.POST.get(f"owner-{record.pk}", "")
            if record.status not in RELEASABLE or not shown_owner:
                refused += 1
                continue
            try:
                ok = release_record(record.scope, record.key_digest, shown_owner, force=force)
            except (StorageError, ValueError) as exc:
                self.message_user(request, f"{record}: {exc}", messages.ERROR)
                continue
            if ok:
                released += 1
            else:
                refused += 1
        if released:
            self.message_user(
                request,
                _(
                    "%(count)d record(s) released. Nothing was re-sent: a redelivery of the "
                    "message, or the producer, runs it again."
                )
                % {"count": released},
                messages.SUCCESS,
            )
        if refused:
            self.message_user(
                request,
                _(
                    "%(count)d record(s) not released: not PROCESSING, owned by another delivery "
                    "since the page was shown, or a live lease without a forced release."
                )
                % {"count": refused},
                messages.WARNING,
            )
        return None


def _result_link(task_id: str) -> str:
    """A link to django-celery-results' row of *task_id*, its status, or why there is none."""
    if not apps.is_installed("django_celery_results"):
        return "—"
    task_result_model = apps.get_model("django_celery_results", "TaskResult")
    found = task_result_model._default_manager.filter(task_id=task_id).first()
    if found is None:
        return str(_("no stored result"))
    try:
        url = reverse("admin:django_celery_results_taskresult_change", args=[found.pk])
    except NoReverseMatch:
        return str(found.status)
    return format_html('<a href="{}">{}</a>', url, found.status)
