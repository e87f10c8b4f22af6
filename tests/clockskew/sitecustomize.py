"""Shift this Python process's wall clock by $DEDUP_TEST_CLOCK_SKEW seconds.

Put on PYTHONPATH for a worker that the clock-skew test starts. Every wall-clock
read made in Python (``time.time``, ``time.time_ns``, ``datetime.now``,
``utcnow``, ``today``) is off by the skew; the monotonic clock is not. Debian's
libfaketime 0.9.10 would shift C-level reads too, but it makes Python's
``time.sleep`` fail with EINVAL, so it cannot run a Celery worker.
"""

import datetime as _datetime
import os as _os
import time as _time

_SKEW = float(_os.environ.get("DEDUP_TEST_CLOCK_SKEW") or 0)

if _SKEW:
    _real_time, _real_time_ns = _time.time, _time.time_ns
    _time.time = lambda: _real_time() + _SKEW
    _time.time_ns = lambda: _real_time_ns() + int(_SKEW * 1_000_000_000)
    _delta = _datetime.timedelta(seconds=_SKEW)

    class _SkewedDatetime(_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return super().now(tz) + _delta

        @classmethod
        def utcnow(cls):
            return super().utcnow() + _delta

        @classmethod
        def today(cls):
            return super().today() + _delta

    _datetime.datetime = _SkewedDatetime
