"""The message table's admin: a read-only changelist and detail page, release and forget."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db import connections
from django.db.models import F, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from dedup_celery.admin import display
from dedup_celery.admin.display import StrOrPromise
from dedup_celery.admin.filters import DuplicatesFilter, LeaseFilter, ScopeFilter
from dedup_celery.backends.db import message_table_alias
from dedup_celery.clock import StoreNow
from dedup_celery.conf import get_settings
from dedup_celery.exceptions import DedupConfigurationError, StorageError
from dedup_celery.managers import DedupRecordQuerySet
from dedup_celery.models import DedupRecord
from dedup_celery.operator import forget_record, release_record
from dedup_celery.states import FORGETTABLE, RELEASABLE

RELEASE_PERMISSION = "dedup_celery.release_deduprecord"
FORGET_PERMISSION = "dedup_celery.forget_deduprecord"

#: The detail page: every column, grouped as an operator reads a record. A column shown
#: through a display method is named by it (``status`` as its badge, ``owner`` as the
#: 32-hex-digit token every command prints); ``tests/operator/test_admin.py`` holds the
#: groups to the full field list.
FIELDSETS: Any = (
    (
        _("Message"),
        {
            "fields": (
                "scope",
                "key",
                "key_digest",
                "task_name",
                "task_id",
                "task_result",
                "attempt",
                "payload_digest",
                "created_at",
            )
        },
    ),
    (
        _("Ownership and lease"),
        {
            "fields": (
                "status_badge",
                "lease",
                "expires_at",
                "owner_token",
                "hostname",
                "pid",
                "process_start",
                "boot_id",
                "pid_namespace",
                "heartbeat_at",
                "updated_at",
                "purge_after",
            )
        },
    ),
    (
        _("Duplicates and takeovers"),
        {
            "fields": (
                "skipped",
                "rescheduled",
                "takeovers",
                "payload_mismatches",
                "last_duplicate_at",
                "last_duplicate_task_id",
                "last_duplicate_result",
            )
        },
    ),
    (_("Result"), {"fields": ("consumed_at", "result")}),
)
#: The columns shown through a display method instead of as themselves.
SHOWN_AS = {"status": "status_badge", "owner": "owner_token"}

if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[DedupRecord]
else:
    _ModelAdmin = admin.ModelAdmin  # not subscriptable at run time


class DedupRecordAdmin(_ModelAdmin):
    """Lists message records; only the release and forget actions change anything."""

    list_display = ("status_badge", "message", "duplicates", "lease", "record_age")
    list_display_links = ("message",)
    list_filter = (
        "status",
        LeaseFilter,
        DuplicatesFilter,
        "task_name",
        ScopeFilter,
        ("created_at", admin.DateFieldListFilter),
    )
    search_fields = ("key", "task_id", "=key_digest")
    ordering = ("-created_at",)
    actions = ("release_records", "forget_records")
    list_per_page = 100
    show_full_result_count = False
    empty_value_display = display.EMPTY
    fieldsets = FIELDSETS
    readonly_fields = tuple(name for _title, group in FIELDSETS for name in group["fields"])

    class Media:
        css = {"all": ("dedup_celery/admin.css",)}

    @property
    def date_hierarchy(self) -> str | None:  # type: ignore[override]  # an attribute in Django
        """``created_at``, except where the database cannot convert to the current time zone.

        MySQL/MariaDB convert with ``CONVERT_TZ``, which needs the server's time zone
        tables; without them the hierarchy's query fails. Only UTC needs no conversion.
        Django's own checks read this, so a broken ``DEDUP_CELERY`` must not raise here:
        the package's checks report it.
        """
        try:
            alias = message_table_alias(get_settings().database)
        except DedupConfigurationError:
            return "created_at"
        if (
            connections[alias].vendor == "mysql"
            and settings.USE_TZ
            and timezone.get_current_timezone_name() != "UTC"
        ):
            return None
        return "created_at"

    def get_queryset(self, request: HttpRequest) -> QuerySet[DedupRecord]:
        """Read the backend's database, with each lease judged and aged by its clock."""
        alias = message_table_alias(get_settings().database)
        rows = cast(DedupRecordQuerySet, super().get_queryset(request).using(alias))
        return rows.with_lease_expired().annotate(store_now=StoreNow())

    def scopes_differ(self, request: HttpRequest) -> bool:
        """True if some record's scope is not its task's name (a ``dedup_scope`` is in use).

        Asked by the column list and the scope filter: one query per request.
        """
        cached = getattr(request, "_dedup_scopes_differ", None)
        if cached is None:
            cached = self.get_queryset(request).exclude(scope=F("task_name")).exists()
            request._dedup_scopes_differ = cached  # type: ignore[attr-defined]
        return cached

    def get_list_display(self, request: HttpRequest) -> Any:
        """The columns; the scope beside the task only when some scope is not the task name."""
        columns = list(super().get_list_display(request))
        if self.scopes_differ(request):
            columns.insert(columns.index("message") + 1, "short_scope")
        return columns

    def get_urls(self) -> list[URLPattern]:
        """The changelist's URLs, plus the overview per task name."""
        from dedup_celery.admin.overview import overview_view

        info = self.opts.app_label, self.opts.model_name
        overview = path(
            "overview/",
            self.admin_site.admin_view(lambda request: overview_view(self, request)),
            name="{}_{}_overview".format(*info),
        )
        return [overview, *super().get_urls()]

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj: DedupRecord) -> SafeString:
        """The status as a coloured badge."""
        return display.badge(obj.status)

    @admin.display(description=_("key and task"), ordering="key")
    def message(self, obj: DedupRecord) -> SafeString:
        """The key's start above the task's name; each whole on hover."""
        return display.message(obj.task_name, obj.key)

    @admin.display(description=_("scope"), ordering="scope")
    def short_scope(self, obj: DedupRecord) -> SafeString:
        """The scope, its end kept when it is long."""
        return display.shortened(obj.scope, 24, keep_end=True)

    @admin.display(description=_("duplicates"), ordering="-skipped")
    def duplicates(self, obj: DedupRecord) -> SafeString | str:
        """Duplicates skipped and rescheduled, takeovers and payload mismatches, where not zero."""
        return display.counters(obj.skipped, obj.rescheduled, obj.takeovers, obj.payload_mismatches)

    @admin.display(description=_("lease"), ordering="expires_at")
    def lease(self, obj: DedupRecord) -> SafeString | str:
        """Time left on a PROCESSING record's lease, in words, by the database's clock."""
        return display.lease_left(obj.status, obj.expires_at, getattr(obj, "store_now", None))

    @admin.display(description=_("age"), ordering="created_at")
    def record_age(self, obj: DedupRecord) -> str:
        """How long ago the record was created, by the database's clock."""
        return display.age(obj.created_at, getattr(obj, "store_now", None))

    @admin.display(description=_("owner token"))
    def owner_token(self, obj: DedupRecord) -> str:
        """The owner token as every command prints it: 32 hex digits."""
        return obj.owner.hex if obj.owner else display.EMPTY

    @admin.display(description=_("task result"))
    def task_result(self, obj: DedupRecord) -> SafeString | str:
        """Link to the consuming task's result, when django-celery-results is installed."""
        return display.result_link(obj.task_id)

    @admin.display(description=_("last duplicate's result"))
    def last_duplicate_result(self, obj: DedupRecord) -> SafeString | str:
        """Link to the latest duplicate's own result row (its meta names the original)."""
        return display.result_link(obj.last_duplicate_task_id)

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

    def has_forget_permission(self, request: HttpRequest) -> bool:
        """Only users with ``dedup_celery.forget_deduprecord`` may forget."""
        return request.user.has_perm(FORGET_PERMISSION)

    def _confirmation(
        self,
        request: HttpRequest,
        records: list[DedupRecord],
        action: str,
        title: StrOrPromise,
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

    def _report(
        self,
        request: HttpRequest,
        done: int,
        done_message: StrOrPromise,
        kept: dict[str, int],
        verb: str,
    ) -> None:
        """One success message, then one warning per reason a record was kept."""
        if done:
            self.message_user(request, done_message % {"count": done}, messages.SUCCESS)
        for reason, count in kept.items():
            self.message_user(
                request,
                _("%(count)d record(s) not %(verb)s: %(reason)s.")
                % {"count": count, "verb": verb, "reason": reason},
                messages.WARNING,
            )

    def _apply(
        self,
        request: HttpRequest,
        records: list[DedupRecord],
        *,
        refusal: Callable[[DedupRecord], str | None],
        change: Callable[[DedupRecord, str], bool],
        why_kept: Callable[[DedupRecord, str], str],
    ) -> tuple[int, dict[str, int]]:
        """Change each record the page showed, against the owner it showed; count the reasons.

        *refusal* says why a record may not be changed at all, *change* is the
        backend's compare-and-delete, *why_kept* reads back why it refused.
        """
        done = 0
        kept: dict[str, int] = {}
        for record in records:
            owner = request.POST.get(f"owner-{record.pk}", "")
            reason = refusal(record) or ("" if owner else str(_("no owner was shown for it")))
            if not reason:
                try:
                    if change(record, owner):
                        done += 1
                        continue
                except (StorageError, ValueError) as exc:
                    self.message_user(request, f"{record}: {exc}", messages.ERROR)
                    continue
                reason = why_kept(record, owner)
            kept[reason] = kept.get(reason, 0) + 1
        return done, kept

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

        def refusal(record: DedupRecord) -> str | None:
            if record.status == DedupRecord.Status.POISONED:
                return str(_("poisoned: release it instead"))
            return None if record.status in FORGETTABLE else str(_("still processing"))

        forgotten, kept = self._apply(
            request,
            records,
            refusal=refusal,
            change=lambda record, owner: forget_record(record.scope, record.key_digest, owner),
            why_kept=lambda record, owner: self._why_kept(request, record, owner, FORGETTABLE),
        )
        self._report(
            request,
            forgotten,
            _(
                "%(count)d record(s) forgotten. Nothing was re-sent: the next delivery of "
                "each message runs its body again."
            ),
            kept,
            str(_("forgotten")),
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
        released, kept = self._apply(
            request,
            records,
            refusal=lambda record: (
                None
                if record.status in RELEASABLE
                else str(_("consumed or failed: forget it instead"))
            ),
            change=lambda record, owner: release_record(
                record.scope, record.key_digest, owner, force=force
            ),
            why_kept=lambda record, owner: self._why_kept(request, record, owner, RELEASABLE),
        )
        self._report(
            request,
            released,
            _(
                "%(count)d record(s) released. Nothing was re-sent: a redelivery of the "
                "message, or the producer, runs it again."
            ),
            kept,
            str(_("released")),
        )
        return None

    def _why_kept(
        self, request: HttpRequest, record: DedupRecord, owner: str, allowed: tuple[str, ...]
    ) -> str:
        """Why the store kept *record*, read back after its compare-and-delete refused."""
        now = self.get_queryset(request).filter(pk=record.pk).first()
        if now is None:
            return str(_("it was already gone"))
        if now.owner is None or now.owner.hex != owner:
            return str(_("the owner changed since the page was shown"))
        if now.status not in allowed:
            return str(_("its status changed meanwhile to %(status)s") % {"status": now.status})
        return str(_("its lease is live: tick the forced release only if its owner is gone"))
