"""On MySQL/MariaDB, compare the record's identity columns byte for byte.

MySQL's default collations ignore case and trailing spaces, so the scopes
``orders`` and ``Orders`` would share records, and a stale-copy check would
take task id ``ABC`` for ``abc``. These columns get a binary, no-pad collation.
Other databases compare text exactly already: nothing runs there.

On MySQL this rewrites the table (a collation change of indexed columns is not
an in-place change); on a large message table, run it in a quiet hour.
"""

from collections.abc import Callable
from typing import Any

from django.db import migrations

#: The columns whose values the store compares for equality.
EXACT_COLUMNS = ("scope", "key_digest", "task_id", "hostname", "boot_id", "pid_namespace")


def _alter(schema_editor: Any, collation_of: Callable[[Any], str]) -> None:
    connection = schema_editor.connection
    if connection.vendor != "mysql":
        return
    from dedup_celery.models import DedupRecord

    qn = connection.ops.quote_name
    clauses = []
    for name in EXACT_COLUMNS:
        field: Any = DedupRecord._meta.get_field(name)
        null = "NULL" if field.null else "NOT NULL"
        clauses.append(
            f"MODIFY {qn(field.column)} {field.db_type(connection)} "
            f"CHARACTER SET utf8mb4 COLLATE {collation_of(connection)} {null}"
        )
    schema_editor.execute(f"ALTER TABLE {qn(DedupRecord._meta.db_table)} " + ", ".join(clauses))


def _binary(connection: Any) -> str:
    return "utf8mb4_nopad_bin" if connection.mysql_is_mariadb else "utf8mb4_0900_bin"


def exact(apps: Any, schema_editor: Any) -> None:
    _alter(schema_editor, _binary)


def back_to_the_default(apps: Any, schema_editor: Any) -> None:
    _alter(schema_editor, lambda connection: "utf8mb4_unicode_ci")


class Migration(migrations.Migration):
    dependencies = [
        ("dedup_celery", "0003_purge_after"),
    ]

    operations = [
        # DDL: MySQL cannot run it inside a transaction.
        migrations.RunPython(exact, back_to_the_default, atomic=False, elidable=False),
    ]
