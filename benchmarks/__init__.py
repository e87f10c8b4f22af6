"""Benchmark scripts for dedup_celery (run with make; not part of the test suite)."""
