"""The changelist's filters: each answers a question an operator asks of the message table."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from dedup_celery.clock import StoreNow
from dedup_celery.states import Status


class ScopeFilter(admin.SimpleListFilter):
    """By scope, offered only when some task shares or renames its scope (``dedup_scope``).

    Otherwise every scope is its task's name and the task filter says it all.
    """

    title = _("scope")
    parameter_name = "scope"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        """The scopes, if any record's scope differs from its task name; else none (hidden)."""
        if not model_admin.scopes_differ(request):
            return []
        scopes = (
            model_admin.get_queryset(request)
            .order_by("scope")
            .values_list("scope", flat=True)
            .distinct()
        )
        return [(scope, scope) for scope in scopes]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        """The records of the chosen scope."""
        value = self.value()
        return queryset.filter(scope=value) if value else queryset


class LeaseFilter(admin.SimpleListFilter):
    """PROCESSING records whose lease is live, or ran out (a stuck or dead delivery)."""

    title = _("lease")
    parameter_name = "lease"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        """Live and expired leases."""
        return [("live", _("live")), ("expired", _("expired: the owner may be gone"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        """PROCESSING records with the chosen lease state, by the database's clock."""
        processing = queryset.filter(status=Status.PROCESSING)
        if self.value() == "live":
            return processing.filter(expires_at__gte=StoreNow())
        if self.value() == "expired":
            return processing.filter(expires_at__lt=StoreNow())
        return queryset


class DuplicatesFilter(admin.SimpleListFilter):
    """Records that met duplicates, some with other arguments, or whose deliveries died."""

    title = _("duplicates")
    parameter_name = "duplicates"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        """Met duplicates, met none, met some with other arguments, taken over."""
        return [
            ("some", _("met duplicates")),
            ("none", _("met none")),
            ("mismatch", _("with other arguments (payload mismatch)")),
            ("takeovers", _("taken over after a delivery died")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        """The records with the chosen duplicate history."""
        met = Q(skipped__gt=0) | Q(rescheduled__gt=0)
        if self.value() == "some":
            return queryset.filter(met)
        if self.value() == "none":
            return queryset.exclude(met)
        if self.value() == "mismatch":
            return queryset.filter(payload_mismatches__gt=0)
        if self.value() == "takeovers":
            return queryset.filter(takeovers__gt=0)
        return queryset
