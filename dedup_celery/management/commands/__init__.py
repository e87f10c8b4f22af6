"""``manage.py`` commands: dedup_purge."""
