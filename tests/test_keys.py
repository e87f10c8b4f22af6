"""Keys: a message's key is its task id or its dedup_key, with the replacement nesting after it."""

from __future__ import annotations

import pytest

from dedup_celery.exceptions import DedupKeyError
from dedup_celery.keys import digest, message_key, nested_key, storable


class Task:
    name = "unit.keys"


class Request:
    """What a task's request and the worker's Request both carry."""

    def __init__(self, nesting=0):
        self.id = "tid-1"
        self.replaced_task_nesting = nesting


def by_order(order_no, **kwargs):
    return f"order:{order_no}"


@pytest.mark.parametrize(
    ("key_function", "nesting", "expected"),
    [
        (None, 0, "tid-1"),
        (None, 1, "tid-1#r1"),
        (None, 3, "tid-1#r3"),
        (by_order, 0, "order:7"),
        (by_order, 2, "order:7#r2"),
    ],
)
def test_the_nesting_of_a_replacement_is_part_of_its_key(key_function, nesting, expected):
    assert message_key(Task(), key_function, Request(nesting), (7,), {}) == expected
    assert nested_key(expected.split("#")[0], nesting) == expected


def test_a_call_without_dedup_stays_without_dedup_when_replaced():
    assert message_key(Task(), lambda *a: None, Request(2), (), {}) is None


def test_a_bad_key_is_refused_at_any_nesting():
    with pytest.raises(DedupKeyError, match="empty string"):
        message_key(Task(), lambda *a: "", Request(1), (), {})


@pytest.mark.parametrize(
    "text",
    ["tid-1", "x" * 255, "ünïcode-ïd", "tab\tand\nnewline", "€" * 255],
)
def test_text_every_store_can_hold_is_stored_unchanged(text):
    assert storable(text) == text


@pytest.mark.parametrize(
    ("text", "other"),
    [
        ("x" * 256, "x" * 257),
        ("x" * 300 + "a", "x" * 300 + "b"),
        ("nul\x00a", "nul\\x00a"),
        ("surrogate\ud800", "surrogate\\ud800"),
    ],
)
def test_other_text_gets_a_short_clean_form_of_its_own(text, other):
    stored = storable(text)
    assert len(stored) <= 255
    assert "\x00" not in stored
    stored.encode("utf-8")  # strict: no lone surrogate left
    assert stored == storable(text)
    assert stored != storable(other)
    assert stored.endswith("#" + digest(text))
