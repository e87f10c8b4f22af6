"""Keys: a message's key is its task id or its dedup_key, with the replacement nesting after it."""

from __future__ import annotations

import pytest

from dedup_celery.exceptions import DedupKeyError
from dedup_celery.keys import message_key, nested_key


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
