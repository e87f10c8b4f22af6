"""Fixtures of the tracer-level tests."""

from __future__ import annotations

import uuid

import pytest

from tests.celery_app import app


@pytest.fixture
def queue(celery_broker):
    """A fresh queue name; ``queue.length()`` counts what was published to it."""
    name = f"q-enqueue-{uuid.uuid4().hex[:8]}"

    class Queue(str):
        def length(self):
            with app.connection_for_read() as conn:
                try:
                    return conn.default_channel.queue_declare(name, passive=True).message_count
                except conn.channel_errors:
                    return 0  # never declared: nothing was ever published to it

    yield Queue(name)
    with app.connection_for_write() as conn:
        conn.default_channel.queue_delete(name)
