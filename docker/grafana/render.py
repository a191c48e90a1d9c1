"""Pictures of the Grafana dashboards drawn from real Prometheus data, one PNG per dashboard.

Each panel of ``docker/grafana/dashboards/*.json`` is placed on Grafana's 24-column grid and its
queries are evaluated as Grafana would: template variables resolved from their own queries
("All" where a variable offers it), ``$__rate_interval`` and ``$__range`` from the time range,
time series from ``query_range``, stats and bar gauges from instant queries (histogram buckets
shown per bucket). Grafana itself is not needed.

    python docker/grafana/render.py --prometheus http://127.0.0.1:9090 --minutes 60

The README's pictures come from ``tests/integration/test_grafana_dashboards.py`` with
``TIRE_GRAFANA_PREVIEWS`` set, which runs a model server under traffic, a Pushgateway and
Prometheus, and calls :func:`render_dashboard`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter

HERE = Path(__file__).resolve().parent
DASHBOARDS = HERE / "dashboards"
PREVIEWS = HERE / "previews"

# Grafana's dark theme.
BACKGROUND, PANEL, TEXT, GRID, MUTED = "#111217", "#181b1f", "#ccccdc", "#2c3235", "#8e8e9b"
PALETTE = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0")
COLORS = {
    "green": "#73bf69",
    "red": "#f2495c",
    "blue": "#5794f2",
    "#EAB839": "#eab839",
    "transparent": "none",
}


# --- reading a dashboard ---------------------------------------------------------------------


def panels(board: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    """Every panel of a dashboard's JSON model, rows' collapsed panels included, rows not."""
    for panel in board.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def interpolate(expr: str, values: Mapping[str, str]) -> str:
    """``$name`` and ``${name}`` replaced by their values, longest names first."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    left = re.findall(r"\$\{?\w+", expr)
    if left:
        raise ValueError(f"no value for {sorted(set(left))} in {expr!r}")
    return expr


def builtins(start: float, end: float, scrape_interval: float, step: float) -> dict[str, str]:
    """Grafana's built-in variables for a time range and step (``$__interval``: the step;
    ``$__rate_interval`` as Grafana derives it: at least four scrape intervals, and one step
    plus one scrape interval)."""
    rate = max(4 * scrape_interval, step + scrape_interval)
    return {
        "__rate_interval": f"{math.ceil(rate)}s",
        "__interval": f"{math.ceil(step)}s",
        "__interval_ms": str(math.ceil(step * 1000)),
        "__range": f"{math.ceil(end - start)}s",
    }


_LABEL_VALUES = re.compile(r"^label_values\((?:(.*),\s*)?(\w+)\)$", re.S)


class Prometheus:
    """Prometheus' HTTP API, as Grafana's data source calls it."""

    def __init__(self, url: str, timeout: float = 30) -> None:
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def _get(self, path: str, params: Mapping[str, Any]) -> Any:
        answer = self.client.get(path, params=dict(params))
        body = answer.json()
        if answer.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"Prometheus answered {answer.status_code} to {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/query", {"query": expr, "time": at})["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": start, "end": end, "step": step}
        return list(self._get("/api/v1/query_range", params)["result"])

    def label_values(self, query: str, start: float, end: float) -> list[str]:
        """The values a ``label_values(selector, label)`` variable query offers."""
        found = _LABEL_VALUES.match(query.strip())
        if found is None:
            raise ValueError(f"not a label_values() query: {query!r}")
        selector, label = found.groups()
        params: dict[str, Any] = {"start": start, "end": end}
        if selector:
            params["match[]"] = selector
        return sorted(self._get(f"/api/v1/label/{label}/values", params))


def resolve_variables(
    board: Mapping[str, Any], prom: Prometheus, start: float, end: float, chosen: Mapping[str, str]
) -> dict[str, str]:
    """Each template variable's value: ``chosen`` first, else "All" where offered, else the
    first value its query returns. A variable whose query returns nothing is an error."""
    values: dict[str, str] = {}
    for variable in board.get("templating", {}).get("list", []):
        name = variable["name"]
        if name in chosen:
            values[name] = chosen[name]
            continue
        options = prom.label_values(interpolate(variable["query"], values), start, end)
        if not options:
            raise LookupError(f"${name}: {variable['query']!r} returns no values")
        values[name] = variable.get("allValue", ".*") if variable.get("includeAll") else options[0]
    return values


# --- formatting ------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{int(seconds // size)}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def format_value(value: float, unit: str, decimals: int | None = None) -> str:
    """A value as Grafana shows it in the units the dashboards use."""
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:.3g} s"
    if unit == "dtdurations":
        return _duration(max(value, 0.0))
    number = f"{value:.{decimals}f}" if decimals is not None else _short(value)
    if unit == "reqps":
        return f"{number} req/s"
    if unit.startswith("suffix:"):
        return number + unit.removeprefix("suffix:")
    return number


def _short(value: float) -> str:
    for suffix, size in (("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def legend(template: str, labels: Mapping[str, str]) -> str:
    if not template or template == "__auto":
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def threshold_color(value: float, field: Mapping[str, Any]) -> str:
    """The colour of the highest threshold step at or below the value, or its mapping's."""
    for mapping in field.get("mappings", []):
        match = mapping.get("options", {}).get(_key(value))
        if match and match.get("color"):
            return COLORS.get(match["color"], match["color"])
    color = "green"
    for step in field.get("thresholds", {}).get("steps", []):
        if step["value"] is None or value >= step["value"]:
            color = step["color"]
    return COLORS.get(color, color)


def _key(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def mapped_text(value: float, field: Mapping[str, Any]) -> str | None:
    for mapping in field.get("mappings", []):
        match = mapping.get("options", {}).get(_key(value))
        if match and match.get("text"):
            return str(match["text"])
    return None


# --- drawing ---------------------------------------------------------------------------------


@dataclass
class Window:
    start: float
    end: float
    step: float
    values: dict[str, str]


def _series(prom: Prometheus, panel: Mapping[str, Any], window: Window) -> list[tuple[str, Any]]:
    found = []
    for target in panel["targets"]:
        expr = interpolate(target["expr"], window.values)
        for item in prom.query_range(expr, window.start, window.end, window.step):
            points = [(float(t), float(v)) for t, v in item["values"]]
            found.append((legend(target.get("legendFormat", ""), item["metric"]), points))
    return found


def _instant(prom: Prometheus, panel: Mapping[str, Any], window: Window) -> list[tuple[str, float]]:
    found = []
    for target in panel["targets"]:
        expr = interpolate(target["expr"], window.values)
        result = prom.query(expr, window.end)
        if target.get("format") == "heatmap":
            # Cumulative le buckets -> one count per bucket, as Grafana's heatmap format does.
            ordered = sorted(result, key=lambda item: float(item["metric"]["le"]))
            previous = 0.0
            for item in ordered:
                value = float(item["value"][1])
                le = item["metric"]["le"]
                found.append(("> last" if le == "+Inf" else f"≤ {le}", max(value - previous, 0.0)))
                previous = value
            continue
        for item in result:
            name = legend(target.get("legendFormat", ""), item["metric"])
            found.append((name, float(item["value"][1])))
    return found


def _style(ax: Axes) -> None:
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(colors=MUTED, labelsize=7, length=0)
    ax.grid(color=GRID, linewidth=0.6)
    ax.set_axisbelow(True)


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "No data", color=MUTED, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _time_axis(ax: Axes, start: float, end: float) -> None:
    """Ticks on whole minutes or hours, at most about seven of them."""
    ax.set_xlim(
        mdates.date2num(datetime.fromtimestamp(start)), mdates.date2num(datetime.fromtimestamp(end))
    )
    minutes = (end - start) / 60
    spacing = next((m for m in (1, 2, 5, 10, 15, 30) if minutes / m <= 7), None)
    if spacing is None:
        hours = next((h for h in (1, 2, 3, 6, 12, 24) if minutes / 60 / h <= 7), 48)
        ax.xaxis.set_major_locator(mdates.HourLocator(interval=hours))
    else:
        ax.xaxis.set_major_locator(mdates.MinuteLocator(byminute=range(0, 60, spacing)))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))


def draw_timeseries(
    ax: Axes, panel: Mapping[str, Any], series: list[tuple[str, Any]], window: Window
) -> None:
    field = panel.get("fieldConfig", {}).get("defaults", {})
    custom = field.get("custom", {})
    unit = field.get("unit", "short")
    _style(ax)
    _time_axis(ax, window.start, window.end)
    series = [(name, [(t, v) for t, v in points if math.isfinite(v)]) for name, points in series]
    series = [(name, points) for name, points in series if points]
    if not series:
        _no_data(ax)
        return
    dashed = {
        o["matcher"]["options"]
        for o in panel.get("fieldConfig", {}).get("overrides", [])
        if o["matcher"]["id"] == "byRegexp"
    }
    stacked = custom.get("stacking", {}).get("mode") == "normal"
    bars = custom.get("drawStyle") == "bars"
    bottoms: dict[float, float] = {}
    for index, (name, points) in enumerate(sorted(series, key=lambda s: s[0])):
        color = PALETTE[index % len(PALETTE)]
        times = mdates.date2num([datetime.fromtimestamp(t) for t, _ in points])
        values = [v for _, v in points]
        base = [bottoms.get(t, 0.0) for t, _ in points] if stacked or bars else [0.0] * len(points)
        tops = [b + v for b, v in zip(base, values, strict=True)]
        style = "--" if any(re.fullmatch(rx, name) for rx in dashed) else "-"
        if bars:
            width = (points[1][0] - points[0][0]) / 86400 * 0.8 if len(points) > 1 else 0.0005
            ax.bar(times, values, bottom=base, width=width, color=color, label=name, alpha=0.85)
        else:
            ax.plot(times, tops, style, color=color, linewidth=1.4, label=name)
            ax.fill_between(times, base, tops, color=color, alpha=0.35 if stacked else 0.08)
        if stacked or bars:
            bottoms.update({t: top for (t, _), top in zip(points, tops, strict=True)})
    # The y range as Grafana sets it: the data's, widened to the soft limits, fixed by min/max;
    # threshold lines are drawn inside it and do not widen it.
    low, high = ax.get_ylim()
    if all(v == 0 for _, points in series for _, v in points):
        low, high = 0.0, 1.0  # Grafana's axis for a flat zero
    low = min(low, custom.get("axisSoftMin", low))
    high = max(high, custom.get("axisSoftMax", high))
    ax.set_ylim(field.get("min", low), field.get("max", high))
    if custom.get("thresholdsStyle", {}).get("mode") in {"dashed", "line"}:
        for step in field.get("thresholds", {}).get("steps", []):
            if step["value"] is not None:
                ax.axhline(step["value"], color=COLORS.get(step["color"]), linestyle="--", lw=1)
    ax.set_ylim(field.get("min", low), field.get("max", high))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, unit)))
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        ncol=4,
        fontsize=6.5,
        frameon=False,
        labelcolor=TEXT,
        handlelength=1.2,
    )


def draw_stat(ax: Axes, panel: Mapping[str, Any], values: list[tuple[str, float]]) -> None:
    field = panel.get("fieldConfig", {}).get("defaults", {})
    mode = panel.get("options", {}).get("textMode", "auto")
    ax.set_facecolor(PANEL)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if not values:
        _no_data(ax)
        return
    count = len(values)
    for index, (name, value) in enumerate(sorted(values)):
        x = (index + 0.5) / count
        color = threshold_color(value, field)
        unit, decimals = field.get("unit", "short"), field.get("decimals")
        text = mapped_text(value, field) or format_value(value, unit, decimals)
        size = 20 if count == 1 else max(9, 20 - 3 * count)
        if mode == "name":
            ax.text(x, 0.45, name, color=color, fontsize=size * 0.8, ha="center", va="center")
            continue
        ax.text(x, 0.42, text, color=color, fontsize=size, ha="center", va="center", weight="bold")
        if mode == "value_and_name" or count > 1:
            ax.text(x, 0.8, name, color=TEXT, fontsize=7, ha="center", va="center")


def draw_bars(ax: Axes, panel: Mapping[str, Any], values: list[tuple[str, float]]) -> None:
    field = panel.get("fieldConfig", {}).get("defaults", {})
    unit = field.get("unit", "short")
    _style(ax)
    ax.grid(False)
    if not values:
        _no_data(ax)
        return
    # Top to bottom in query order, as Grafana's horizontal bar gauge: short names (buckets)
    # beside their bars, longer ones above them.
    names = [name for name, _ in values][::-1]
    numbers = [value for _, value in values][::-1]
    above = max(len(name) for name in names) > 8
    height = 0.45 if above else 0.7
    ax.barh(range(len(numbers)), numbers, color=COLORS["blue"], height=height, align="edge")
    top = max(numbers) or 1.0
    for y, (name, value) in enumerate(zip(names, numbers, strict=True)):
        if above:
            ax.text(0, y + 0.5, name, color=TEXT, va="bottom", size=6.5)
        else:
            ax.text(-top * 0.02, y + height / 2, name, color=TEXT, va="center", ha="right", size=7)
        ax.text(value + top * 0.02, y + height / 2, format_value(value, unit), color=TEXT,
                va="center", size=7)  # fmt: skip
    ax.set_xlim(-top * (0 if above else 0.14), top * 1.2)
    ax.set_ylim(-0.1, len(numbers) + 0.15)
    ax.set_xticks([])
    ax.set_yticks([])


def render_dashboard(
    board: Mapping[str, Any],
    prom: Prometheus,
    output: Path,
    *,
    start: float,
    end: float,
    scrape_interval: float = 15.0,
    chosen: Mapping[str, str] | None = None,
) -> Path:
    """Draw every panel of ``board`` from ``prom`` over ``[start, end]`` into ``output`` (PNG)."""
    step = max(1.0, (end - start) / 240)
    values = resolve_variables(board, prom, start, end, chosen or {})
    window = Window(start, end, step, {**builtins(start, end, scrape_interval, step), **values})
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    column, unit = 20 / 24, 0.34  # inches per grid column and per grid row
    width, height = 20.0, rows * unit + 0.8
    fig = plt.figure(figsize=(width, height), facecolor=BACKGROUND, dpi=110)
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    span = f"{datetime.fromtimestamp(start):%H:%M} to {datetime.fromtimestamp(end):%H:%M}"
    fig.text(0.01, 1 - 0.3 / height, board["title"], color=TEXT, fontsize=14, weight="bold")
    fig.text(0.99, 1 - 0.3 / height, f"{shown}   {span}", color=MUTED, fontsize=8, ha="right")
    for panel in board["panels"]:
        grid = panel["gridPos"]
        left = grid["x"] * column / width
        top = 1 - (0.8 + grid["y"] * unit) / height
        if panel["type"] == "row":
            fig.text(left + 0.003, top - 0.6 * unit / height, panel["title"], color=TEXT, size=10)
            continue
        pad = 0.06
        title_h = 0.32
        box = (
            left + pad / width,
            top - (grid["h"] * unit - pad) / height,
            (grid["w"] * column - 2 * pad) / width,
            (grid["h"] * unit - 2 * pad) / height,
        )
        frame = fig.add_axes(box)
        frame.set_facecolor(PANEL)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(GRID)
        frame.text(0.01, 1 - 0.18 / (box[3] * height), panel["title"], color=TEXT, size=8.5,
                   transform=frame.transAxes, va="center", weight="bold")  # fmt: skip
        legend_h = 0.55 if panel["type"] == "timeseries" else 0.1
        axis_w = 0.62 if panel["type"] == "timeseries" else 0.1  # room for the y ticks
        inner = (
            box[0] + axis_w / width,
            box[1] + legend_h / height,
            box[2] - (axis_w + 0.1) / width,
            box[3] - (title_h + legend_h) / height,
        )
        ax = fig.add_axes(inner)
        if panel["type"] == "timeseries":
            draw_timeseries(ax, panel, _series(prom, panel, window), window)
        elif panel["type"] == "stat":
            draw_stat(ax, panel, _instant(prom, panel, window))
        else:
            draw_bars(ax, panel, _instant(prom, panel, window))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, facecolor=BACKGROUND)
    plt.close(fig)
    return output


def load(folder: Path = DASHBOARDS) -> dict[str, dict[str, Any]]:
    """The dashboards' JSON models by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw each Grafana dashboard into a PNG.")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus' URL")
    parser.add_argument("--minutes", type=float, default=60, help="time range, ending now")
    parser.add_argument("--scrape-interval", type=float, default=15, help="seconds")
    parser.add_argument("--output", type=Path, default=PREVIEWS, help="folder of the PNGs")
    parser.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE", help="a variable's value"
    )
    args = parser.parse_args(argv)
    chosen = dict(item.split("=", 1) for item in args.var)
    end = time.time()
    prom = Prometheus(args.prometheus)
    for name, board in load().items():
        path = render_dashboard(
            board,
            prom,
            args.output / f"{name}.png",
            start=end - args.minutes * 60,
            end=end,
            scrape_interval=args.scrape_interval,
            chosen=chosen,
        )
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
