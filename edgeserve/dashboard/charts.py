"""Small SVG charts, rendered on the server: no script, no chart library, works offline."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from math import isfinite


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def interval_chart(
    rows: Sequence[tuple[str, float, float | None, float | None, str]],
    width: int = 600,
    title: str = "",
) -> str:
    """Estimates with confidence intervals, (label, est, low, high, better_when: "higher"
    or "lower"; green is the better side, red the worse), each row on its own
    scale centred on zero: a latency in ms and an error rate share no axis, so one wide
    interval cannot shrink the others to dots. A row without a finite interval says so."""
    left, right, row_h = 170, width - 150, 30
    height = row_h * len(rows) + 16
    parts = [
        f'<svg class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{escape(title)}</title>'
    ]
    for i, (label, est, low, high, better) in enumerate(rows):
        y = 18 + i * row_h
        parts.append(f'<text x="5" y="{y + 4}" font-size="12">{escape(label)}</text>')
        if low is None or high is None or not all(isfinite(v) for v in (est, low, high)):
            parts.append(
                f'<text x="{left}" y="{y + 4}" font-size="12" fill="#57606a">'
                "no finite interval yet (too few samples)</text>"
            )
            continue
        span = max(abs(est), abs(low), abs(high), 1e-12) * 1.15

        def x(value: float, span: float = span) -> float:
            return left + (value + span) / (2 * span) * (right - left)

        up, down = ("#1a7f37", "#cf222e") if better != "lower" else ("#cf222e", "#1a7f37")
        colour = up if low > 0 else down if high < 0 else "#57606a"
        parts.append(
            f'<line x1="{x(0):.1f}" y1="{y - 9}" x2="{x(0):.1f}" y2="{y + 9}" '
            'stroke="#888" stroke-dasharray="3,3"/>'
        )
        parts.append(
            f'<line x1="{x(low):.1f}" y1="{y}" x2="{x(high):.1f}" y2="{y}" '
            f'stroke="{colour}" stroke-width="3"/>'
        )
        parts.append(f'<circle cx="{x(est):.1f}" cy="{y}" r="5" fill="{colour}"/>')
        parts.append(
            f'<text x="{right + 8}" y="{y + 4}" font-size="11">[{low:.3g}, {high:.3g}]</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(
    rows: Sequence[tuple[str, float]], width: int = 520, title: str = "", unit: str = ""
) -> str:
    """Horizontal bars: (label, value)."""
    top = max([v for _, v in rows] + [1e-9])
    left, right, row_h = 150, width - 80, 24
    height = row_h * len(rows) + 10
    parts = [
        f'<svg class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{escape(title)}</title>'
    ]
    for i, (label, value) in enumerate(rows):
        y = 5 + i * row_h
        w = (right - left) * value / top
        parts.append(f'<text x="5" y="{y + 14}" font-size="12">{escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="16" fill="#0969da"/>')
        parts.append(
            f'<text x="{left + w + 5:.1f}" y="{y + 14}" font-size="12">'
            f"{_fmt(value)}{escape(unit)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def sparkline(values: Sequence[float], width: int = 520, height: int = 60, title: str = "") -> str:
    """A line over time (oldest first)."""
    if not values:
        values = [0.0]
    top = max(max(values), 1e-9)
    step = width / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{height - 5 - (v / top) * (height - 10):.1f}" for i, v in enumerate(values)
    )
    return (
        f'<svg class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{escape(title)}</title>'
        f'<polyline points="{points}" fill="none" stroke="#0969da" stroke-width="2"/>'
        f'<text x="{width - 90}" y="12" font-size="11">max {_fmt(top)}</text></svg>'
    )
