"""The throughput chart of docs/BENCHMARKS.md: each variant's ratio to plain Celery (matplotlib).

Drawn from the results of one ``make bench`` run, with that run's machine line,
so the chart and the tables always come from the same measurement.
"""

from __future__ import annotations

from pathlib import Path

LABELS = {
    "plain_atomic": "plain in atomic",
    "status": "status, db",
    "transactional": "transactional",
    "redis": "status, redis",
    "floor_status": "floor: status",
    "floor_transactional": "floor: transactional",
    "floor_redis": "floor: redis",
    "celery_dedup": "Celery dedup-successful",
    "celery_once": "celery-once",
    "celery_singleton": "celery-singleton",
}
BODIES = {"row": "one row", "read": "3 reads + 1 row"}
MODES = {"default": "default close", "reuse": "DB_REUSE_MAX"}


def config_label(result: dict) -> str:
    """``one row, DB_REUSE_MAX, c=4`` for a configuration's results."""
    return f"{BODIES[result['body']]}\n{MODES[result['connections']]}, c={result['concurrency']}"


def write_chart(results: dict, path: Path) -> None:
    """Draw the median ratio to plain per variant and configuration, as SVG, to *path*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(results.get("throughput", {}).values())
    variants = [v for v in LABELS if any(v in c["median_ratio_to_plain"] for c in configs)]
    fig, ax = plt.subplots(figsize=(12, 5.2))
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        xs, ys = [], []
        for j, config in enumerate(configs):
            ratio = config["median_ratio_to_plain"].get(variant)
            if ratio is not None:
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(ratio)
        bars = ax.bar(xs, ys, width, label=LABELS[variant])
        ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(configs)), [config_label(c) for c in configs], fontsize=8)
    ax.set_ylabel("throughput ratio to plain Celery (median of rounds)")
    ax.set_ylim(0, 1.25)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax.set_title(f"{results.get('machine', '')}; PostgreSQL {results.get('postgresql', '')}",
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)
