"""The message table: one record per (scope, key) that a DedupTask has seen."""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _

from dedup_celery.backends.base import RECORD_FIELDS, Record
from dedup_celery.managers import DedupRecordQuerySet
from dedup_celery.states import Status


class DedupRecord(models.Model):
    """One message, identified by its scope and the sha256 of its key.

    The columns are :data:`~dedup_celery.backends.base.RECORD_FIELDS`, in that
    order (a test holds them equal). Every time on this model is written by SQL
    from the database's clock, so none of the fields use ``auto_now``.
    """

    Status = Status

    scope = models.CharField(_("scope"), max_length=255)
    key = models.CharField(
        _("key"), max_length=255, help_text=_("The key for display; may be truncated.")
    )
    key_digest = models.CharField(_("key digest"), max_length=64)
    status = models.CharField(_("status"), max_length=16, choices=Status.choices)
    owner = models.UUIDField(_("owner token"), null=True, blank=True)
    task_id = models.CharField(_("task id"), max_length=255)
    task_name = models.CharField(_("task name"), max_length=255)
    attempt = models.PositiveIntegerField(_("attempt"), default=0)
    hostname = models.CharField(_("owner host"), max_length=255, blank=True)
    pid = models.IntegerField(_("owner pid"), null=True, blank=True)
    process_start = models.BigIntegerField(
        _("owner process start"),
        null=True,
        blank=True,
        help_text=_("Start time of the owner process in clock ticks since boot."),
    )
    boot_id = models.CharField(_("owner boot id"), max_length=64, blank=True)
    pid_namespace = models.CharField(_("owner pid namespace"), max_length=64, blank=True)
    created_at = models.DateTimeField(_("created at"))
    updated_at = models.DateTimeField(_("updated at"))
    expires_at = models.DateTimeField(_("expires at"))
    consumed_at = models.DateTimeField(_("consumed at"), null=True, blank=True)
    heartbeat_at = models.DateTimeField(_("heartbeat at"), null=True, blank=True)
    skipped = models.PositiveIntegerField(_("duplicates skipped"), default=0)
    rescheduled = models.PositiveIntegerField(_("duplicates rescheduled"), default=0)
    takeovers = models.PositiveIntegerField(_("takeovers"), default=0)
    last_duplicate_at = models.DateTimeField(_("last duplicate at"), null=True, blank=True)
    result = models.JSONField(_("result"), null=True, blank=True)
    # NULL means "not computed", which is different from any digest.
    payload_digest = models.CharField(  # noqa: DJ001
        _("payload digest"), max_length=64, null=True, blank=True
    )

    purge_after = models.DateTimeField(
        _("purge after"),
        null=True,
        blank=True,
        help_text=_("A purge keeps the record until then, whatever its status."),
    )
    last_duplicate_task_id = models.CharField(  # noqa: DJ001
        _("last duplicate task id"),
        max_length=255,
        null=True,
        blank=True,
        help_text=_("The task id of the latest duplicate counted on this record."),
    )
    # db_default: workers of earlier releases insert rows without this column. An
    # IntegerField, not a PositiveIntegerField: its CHECK constraint would make adding
    # the column scan (PostgreSQL) or copy (MySQL) the whole table under its lock.
    payload_mismatches = models.IntegerField(
        _("payload mismatches"),
        default=0,
        db_default=0,
        help_text=_("Duplicates whose arguments differed from this message's."),
    )

    objects = DedupRecordQuerySet.as_manager()

    class Meta:
        verbose_name = _("message record")
        verbose_name_plural = _("message records")
        constraints = [
            models.UniqueConstraint(
                fields=["scope", "key_digest"], name="dedup_celery_scope_key_uniq"
            ),
        ]
        indexes = [
            models.Index(fields=["expires_at"], name="dedup_celery_expires_idx"),
            models.Index(fields=["purge_after"], name="dedup_celery_purge_idx"),
        ]
        permissions = [
            ("release_deduprecord", _("Can release a processing message record")),
            ("forget_deduprecord", _("Can forget a consumed or failed message record")),
        ]

    def __str__(self) -> str:
        return f"{self.scope}: {self.key} ({self.status})"

    def as_record(self) -> Record:
        """Return this row as a :class:`~dedup_celery.backends.base.Record` snapshot."""
        values = {name: getattr(self, name) for name in RECORD_FIELDS}
        if values["owner"] is not None:
            values["owner"] = values["owner"].hex
        lease_expired = getattr(self, "lease_expired", None)
        return Record(
            **values, lease_expired=None if lease_expired is None else bool(lease_expired)
        )
