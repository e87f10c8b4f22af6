"""What the payload fingerprint costs per delivery: ``python benchmarks/fingerprint.py``.

Issue 13 puts :func:`dedup_celery.payload.fingerprint` on every claim, so its
CPU time is part of DedupTask's own per-delivery cost (``make bench-overhead``).
Measured for a small message, a 1 KB one and one at ``RESULT_MAX_BYTES``
(64 KiB by default), as the median of several rounds of process CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()
    print(f"{'message':34} {'µs per fingerprint (median of ' + str(options.rounds) + ')':>36}")
    for name, (args, kwargs) in CASES.items():
        calls = 20000 if name.startswith("small") else 500
        rounds = [per_call(args, kwargs, calls) for _ in range(options.rounds)]
        print(f"{name:34} {statistics.median(rounds) * 1e6:36.1f}")


if __name__ == "__main__":
    main()
