"""Django app configuration for dedup_celery."""

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class DedupCeleryConfig(AppConfig):
    """Registers the message table, the system checks and the worker start-up hook."""

    name = "dedup_celery"
    verbose_name = _("Celery message deduplication")
    # Pinned so a project's DEFAULT_AUTO_FIELD never changes this app's schema.
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register checks; a Celery worker with check errors does not start, others log them."""
        from celery.signals import worker_init, worker_ready

        from dedup_celery import checks
        from dedup_celery.delivery import visibility

        worker_init.connect(
            checks.refuse_to_start_on_errors, weak=False, dispatch_uid="dedup_celery.start"
        )
        worker_init.connect(
            visibility.remember_task_events, weak=False, dispatch_uid="dedup_celery.events"
        )
        worker_ready.connect(
            checks.log_check_messages, weak=False, dispatch_uid="dedup_celery.checks"
        )
        from dedup_celery.conf import raw_settings

        raw = raw_settings()
        if isinstance(raw, dict) and raw.get("PROMETHEUS"):
            from dedup_celery import prometheus

            prometheus.install()
