"""The Django admin of the message table: the records, their actions, and an overview.

Read-only but for two actions, release and forget, which go through the
backend's compare-and-delete. The overview page sums the records per task name.
"""

from django.contrib import admin

from dedup_celery.admin.records import FORGET_PERMISSION, RELEASE_PERMISSION, DedupRecordAdmin
from dedup_celery.models import DedupRecord

admin.site.register(DedupRecord, DedupRecordAdmin)

__all__ = ["FORGET_PERMISSION", "RELEASE_PERMISSION", "DedupRecordAdmin"]
