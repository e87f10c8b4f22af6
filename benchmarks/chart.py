"""The throughput chart of docs/BENCHMARKS.md: each variant's ratio to plain Celery, as SVG.

Drawn from the results of one ``make bench`` run, with that run's machine line,
so the chart and the tables always come from the same measurement.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

MODES = {"default": "Celery's default connection handling", "reuse": "CELERY_DB_REUSE_MAX set"}
COLOURS = {"status": "#4c72b0", "transactional": "#55a868", "redis": "#c44e52"}


def throughput_svg(results: dict) -> str:
    """Return an SVG bar chart of the median throughput ratio to plain, per connection mode."""
    width, height, left, top, bar, gap = 720, 300, 60, 40, 70, 60
    plot_h = height - top - 60
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14">Throughput ratio to plain Celery '
        f"(median of rounds; 1.0 = plain)</text>",
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#ddd"/>')  # fmt: skip
        parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{tick:.2f}</text>')
    x = left + 20
    for mode, label in MODES.items():
        ratios = results.get("throughput", {}).get(mode, {}).get("median_ratio_to_plain", {})
        start = x
        for variant, colour in COLOURS.items():
            if variant not in ratios:
                continue
            ratio = ratios[variant]
            h = plot_h * min(ratio, 1.1)
            y = top + plot_h - h
            parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" '
                         f'fill="{colour}"/>')  # fmt: skip
            parts.append(f'<text x="{x + bar / 2}" y="{y - 4:.1f}" text-anchor="middle">'
                         f"{ratio:.2f}</text>")  # fmt: skip
            parts.append(f'<text x="{x + bar / 2}" y="{top + plot_h + 14}" '
                         f'text-anchor="middle">{variant}</text>')  # fmt: skip
            x += bar + 6
        parts.append(f'<text x="{(start + x) / 2}" y="{top + plot_h + 32}" '
                     f'text-anchor="middle">{escape(label)}</text>')  # fmt: skip
        x += gap
    parts.append(f'<text x="{left}" y="{height - 8}" fill="#555">'
                 f"{escape(str(results.get('machine', '')))}; PostgreSQL "
                 f"{escape(str(results.get('postgresql', '')))}</text>")  # fmt: skip
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_chart(results: dict, path: Path) -> None:
    """Write the chart for *results* to *path*."""
    path.write_text(throughput_svg(results))
