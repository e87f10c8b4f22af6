"""What the payload fingerprint costs per delivery: ``python benchmarks/fingerprint.py``.

Every claim computes :func:`dedup_celery.payload.fingerprint` (unless
``PAYLOAD_MISMATCH`` is ``"ignore"``), so its CPU time is part of DedupTask's
own per-delivery cost (``make bench-overhead``). Measured for a small message,
a 1 KiB one and two at ``RESULT_MAX_BYTES`` (64 KiB by default), as the median
of several rounds of process CPU time, beside what the worker already spends
to decode the same arguments from the message (kombu's ``loads``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kombu.utils import json as kombu_json  # noqa: E402

from dedup_celery.conf import DEFAULTS  # noqa: E402
from dedup_celery.payload import fingerprint  # noqa: E402

CASES = {
    "small (an id and a note)": ((42, "A-1"), {"note": "first"}),
    "1 KiB string": (("x" * 1024,), {}),
    "RESULT_MAX_BYTES string": (("x" * DEFAULTS["RESULT_MAX_BYTES"],), {}),
    "RESULT_MAX_BYTES of small dicts": (
        ([{"sku": f"s-{n:05d}", "qty": n % 7} for n in range(DEFAULTS["RESULT_MAX_BYTES"] // 27)],),
        {},
    ),
}


def per_call(args: tuple, kwargs: dict, calls: int) -> float:
    """CPU seconds per fingerprint, over *calls* calls."""
    start = time.process_time()
    for _ in range(calls):
        fingerprint(args, kwargs)
    return (time.process_time() - start) / calls


def decode_per_call(args: tuple, kwargs: dict, calls: int) -> float:
    """CPU seconds per decode of the same arguments as a message body carries them."""
    body = kombu_json.dumps([list(args), kwargs, {}])
    start = time.process_time()
    for _ in range(calls):
        kombu_json.loads(body)
    return (time.process_time() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()
    print(f"µs of CPU per call, median of {options.rounds} rounds")
    print(f"{'message':34} {'fingerprint':>12} {'decode':>8} {'ratio':>6}")
    for name, (args, kwargs) in CASES.items():
        calls = 20000 if name.startswith("small") else 500
        hashed = statistics.median(per_call(args, kwargs, calls) for _ in range(options.rounds))
        decoded = statistics.median(
            decode_per_call(args, kwargs, calls) for _ in range(options.rounds)
        )
        print(f"{name:34} {hashed * 1e6:12.1f} {decoded * 1e6:8.1f} {hashed / decoded:6.2f}")


if __name__ == "__main__":
    main()
