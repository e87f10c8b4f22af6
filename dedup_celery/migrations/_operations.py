"""Operations the migrations share (the loader skips modules whose name starts with ``_``)."""

from typing import Any

from django.db import migrations


class LockTimeoutOnPostgreSQL(migrations.RunSQL):
    """``SET LOCAL lock_timeout`` for the rest of the migration's transaction, on PostgreSQL."""

    def __init__(self, timeout: str) -> None:
        super().__init__(f"SET LOCAL lock_timeout = '{timeout}'", migrations.RunSQL.noop)

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
