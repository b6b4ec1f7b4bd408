"""Inline SVG charts (no JavaScript, no images): each site's cumulative ε across runs."""

from __future__ import annotations

from html import escape
from typing import Any

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#d62728",
)
WIDTH, HEIGHT = 920, 340
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 20, 62


def epsilon_chart(budget: dict[str, Any]) -> str:
    """Cumulative ε per site over the runs' rounds (x: each (run, round) in time order), with
    each site's cap dashed; only verified receipts are drawn."""
    steps = budget["steps"]
    sites = [s for s in budget["sites"] if s["series"]]
    if not steps or not sites:
        return '<p class="muted">No verified receipts yet: nothing to chart.</p>'
    top = max(
        [p["epsilon"] or 0.0 for s in sites for p in s["series"]] + [s["cap"] or 0.0 for s in sites]
    )
    top = top * 1.08 or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    span = len(steps)  # position 0 is the start (nothing spent), step i sits at i + 1

    def x(i: float) -> float:
        return LEFT + plot_w * (i + 1) / span

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    out = [
        f'<svg id="epsilon-chart" role="img" xmlns="http://www.w3.org/2000/svg" '
        f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        'font-family="sans-serif" font-size="11">',
        "<title>Cumulative ε per site across runs (verified receipts only)</title>",
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#999"/>',
    ]
    for tick in _ticks(top):
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            f'stroke="#e2e2e2"/><text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" '
            f'text-anchor="end">{tick:g}</text>'
        )
    previous_run = None
    for i, step in enumerate(steps):
        if step["run"] != previous_run:
            previous_run = step["run"]
            out.append(
                f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{TOP}" y2="{TOP + plot_h}" '
                'stroke="#bbb" stroke-dasharray="2,3"/>'
                f'<text x="{x(i) + 3:.1f}" y="{TOP + plot_h + 28}" fill="#555">'
                f"{escape(_short(step['run']))}</text>"
            )
        out.append(
            f'<text x="{x(i):.1f}" y="{TOP + plot_h + 14}" text-anchor="middle" '
            f'fill="#777">{step["round"]}</text>'
        )
    out.append(
        f'<text x="{x(-1):.1f}" y="{TOP + plot_h + 14}" text-anchor="middle" fill="#777">'
        "start</text>"
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
        "round (runs in time order)</text>"
        f'<text x="14" y="{TOP + plot_h / 2:.1f}" transform="rotate(-90 14 '
        f'{TOP + plot_h / 2:.1f})" text-anchor="middle">ε spent (cumulative)</text>'
    )
    for cap in sorted({s["cap"] for s in sites if s["cap"] is not None}):
        out.append(
            f'<line class="cap" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(cap):.1f}" '
            f'y2="{y(cap):.1f}" stroke="#b42318" stroke-dasharray="6,4"/>'
            f'<text x="{LEFT + 4}" y="{y(cap) - 4:.1f}" fill="#b42318">cap {cap:g}</text>'
        )
    for n, site in enumerate(sites):
        colour = PALETTE[n % len(PALETTE)]
        points = [p for p in site["series"] if p["epsilon"] is not None]
        path = [f"{x(-1):.1f},{y(0):.1f}"]
        for i, p in enumerate(points):
            before = points[i - 1]["epsilon"] if i else 0.0
            path.append(f"{x(p['x']):.1f},{y(before):.1f}")
            path.append(f"{x(p['x']):.1f},{y(p['epsilon']):.1f}")
        out.append(
            f'<polyline class="site-line" data-site="{escape(site["site"])}" fill="none" '
            f'stroke="{colour}" stroke-width="2" points="{" ".join(path)}"/>'
        )
        for p in points:
            marker = "declined" if p["kind"] == "decline" else "trained"
            out.append(
                f'<circle cx="{x(p["x"]):.1f}" cy="{y(p["epsilon"]):.1f}" r="3.5" '
                f'fill="{colour if marker == "trained" else "white"}" stroke="{colour}">'
                f"<title>{escape(site['site'])} · run {escape(p['run_id'])} round {p['round']}"
                f" · ε {p['epsilon']:.3f} ({marker})</title></circle>"
            )
        legend_y = TOP + 14 + 16 * n
        out.append(
            f'<rect x="{WIDTH - RIGHT + 12}" y="{legend_y - 9}" width="12" height="12" '
            f'fill="{colour}"/><text x="{WIDTH - RIGHT + 30}" y="{legend_y + 1}">'
            f"{escape(site['site'])}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _ticks(top: float) -> list[float]:
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100):
        if top / step <= 8:
            return [round(step * i, 6) for i in range(int(top / step) + 1)]
    return [0.0, top]


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]
