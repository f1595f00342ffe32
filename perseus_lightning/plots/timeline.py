"""Pipeline timeline (Gantt chart) of one simulated iteration, bars coloured by SM frequency."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from perseus_lightning.core.profile import BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, INSTRUCTION_KINDS
from perseus_lightning.core.simulator import SimulationResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure

FREQUENCY_COLORMAP = "viridis"
"""Sequential colormap: the lowest planned clock gets its low end, the highest its high end."""
KIND_HATCHES: dict[str, str] = {FORWARD: "", BACKWARD: "///", BACKWARD_INPUT: "\\\\\\", BACKWARD_WEIGHT: "..."}
KIND_LABELS: dict[str, str] = {
    FORWARD: "forward", BACKWARD: "backward", BACKWARD_INPUT: "backward (input grad)", BACKWARD_WEIGHT: "backward (weight grad)",
}
DPI = 150

_WIDTH_IN = 12.0
_ROW_IN = 0.42
_MIN_ROWS_IN = 1.7
_LEFT_IN, _RIGHT_IN, _TOP_IN, _BOTTOM_IN = 0.85, 1.25, 0.65, 0.55
_COLORBAR_GAP_IN, _COLORBAR_WIDTH_IN = 0.15, 0.15
_BAR_HEIGHT = 0.8
_LABEL_FONT_PT = 7.0
_DIGIT_WIDTH_PT = 0.62 * _LABEL_FONT_PT
_LABEL_PADDING_PT = 3.0
_DARK_INK = (0.0, 0.0, 0.0, 0.5)
_LIGHT_INK = (1.0, 1.0, 1.0, 0.6)
_DARK_LUMINANCE = 0.2
"""Bars whose relative luminance is at most this get light text, edges and hatching."""


def plot_timeline(result: SimulationResult, path: str | Path, title: str | None = None) -> Path:
    """Save the Gantt chart of ``result`` as a PNG at ``path`` and return the path.

    One row per rank (rank 0 on top), one bar per instruction coloured by its frequency, backward
    passes hatched, microbatch numbers inside bars wide enough for them, and a dashed line at the
    iteration time. ``title`` defaults to the schedule, its size, iteration time and energy.
    """
    path = Path(path)
    timeline_figure(result, title).savefig(path, dpi=DPI, format="png")
    return path


def timeline_figure(result: SimulationResult, title: str | None = None) -> Figure:
    """The :func:`plot_timeline` chart as a :class:`matplotlib.figure.Figure` (no pyplot involved)."""
    from matplotlib.colorbar import Colorbar
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    dag = result.dag
    num_ranks = dag.num_ranks
    iteration_time = result.iteration_time
    rows_in = max(_ROW_IN * num_ranks, _MIN_ROWS_IN)
    height_in = _TOP_IN + _BOTTOM_IN + rows_in
    axes_width_in = _WIDTH_IN - _LEFT_IN - _RIGHT_IN
    fig = Figure(figsize=(_WIDTH_IN, height_in))
    ax = fig.add_axes((_LEFT_IN / _WIDTH_IN, _BOTTOM_IN / height_in, axes_width_in / _WIDTH_IN, rows_in / height_in))
    colorbar_ax = fig.add_axes((
        (_LEFT_IN + axes_width_in + _COLORBAR_GAP_IN) / _WIDTH_IN, _BOTTOM_IN / height_in,
        _COLORBAR_WIDTH_IN / _WIDTH_IN, rows_in / height_in,
    ))

    colors = frequency_colors(result.frequencies)
    on_light = _luminance(colors) > _DARK_LUMINANCE
    kinds = np.array([ins.kind for ins in dag.instructions])
    legend_handles = []
    for kind in INSTRUCTION_KINDS:
        if not (kinds == kind).any():
            continue
        hatch = KIND_HATCHES[kind] or None
        for light in (True, False):  # one edge (and hatch) colour per collection, contrasting with the bars
            nodes = np.flatnonzero((kinds == kind) & (on_light == light))
            if not len(nodes):
                continue
            ax.add_collection(PolyCollection(
                _bar_outlines(result.start[nodes], result.end[nodes], dag.ranks[nodes]),
                facecolors=colors[nodes], edgecolors=_DARK_INK if light else _LIGHT_INK, linewidths=0.4, hatch=hatch,
            ))
        legend_handles.append(Patch(facecolor="white", edgecolor="0.3", hatch=hatch, label=KIND_LABELS[kind]))
    ax.axvline(iteration_time, color="black", linestyle="--", linewidth=1.2)
    legend_handles.append(Line2D([], [], color="black", linestyle="--", label=f"iteration time {iteration_time:.3f} s"))

    x_max = iteration_time * 1.01
    ax.set_xlim(0, x_max)
    ax.set_ylim(num_ranks - 0.5, -0.5)
    ax.set_yticks(range(num_ranks), [f"rank {r}" for r in range(num_ranks)])
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("time (s)")
    ax.grid(axis="x", color="0.85", linewidth=0.6)
    ax.set_axisbelow(True)
    _label_microbatches(ax, result, colors, on_light, points_per_second=axes_width_in * 72 / x_max)

    cmap, norm = frequency_scale(result.frequencies)
    colorbar = Colorbar(colorbar_ax, cmap=cmap, norm=norm)
    colorbar.set_label("SM frequency (MHz)")
    if result.frequencies.min() == result.frequencies.max():
        colorbar.set_ticks([int(result.frequencies[0])])
    ax.legend(handles=legend_handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(legend_handles),
              frameon=False, fontsize=8, handlelength=2.2, handleheight=1.1, borderaxespad=0.2)
    fig.text(_LEFT_IN / _WIDTH_IN, 1 - 0.12 / height_in, title if title is not None else default_title(result),
             ha="left", va="top", fontsize=11, fontweight="bold")
    return fig


def default_title(result: SimulationResult) -> str:
    """Schedule name, pipeline size, iteration time and energy, e.g. ``"1f1b: 8 stages x 12 microbatches ..."``."""
    schedule = result.dag.schedule
    size = f"{schedule.num_ranks} stages"
    if schedule.num_stages > schedule.num_ranks:
        size += f" ({schedule.num_stages} model chunks)"
    energy = result.energy
    energy_text = f"{energy / 1e3:.2f} kJ" if energy >= 1e3 else f"{energy:.1f} J"
    return (f"{schedule.name}: {size} \u00d7 {schedule.num_microbatches} microbatches \u2014 "
            f"iteration {result.iteration_time:.3f} s, {energy_text}")


def frequency_colors(frequencies: np.ndarray) -> np.ndarray:
    """RGBA (``N x 4``) of each node's bar: the colormap's ends at the lowest and highest frequency."""
    cmap, norm = frequency_scale(frequencies)
    return cmap(norm(np.asarray(frequencies)))


def frequency_scale(frequencies: np.ndarray) -> tuple[Colormap, Normalize]:
    """Colormap and norm spanning ``frequencies``; a single frequency gets the colormap's high end."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, Normalize

    cmap = colormaps[FREQUENCY_COLORMAP]
    low, high = float(np.min(frequencies)), float(np.max(frequencies))
    if low == high:
        return ListedColormap([cmap(1.0)]), Normalize(low - 0.5, high + 0.5)
    return cmap, Normalize(low, high)


def _bar_outlines(start: np.ndarray, end: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Rectangles (``N x 4 x 2`` vertices) from ``start`` to ``end`` centred on each rank's row."""
    top = ranks - _BAR_HEIGHT / 2
    bottom = ranks + _BAR_HEIGHT / 2
    return np.stack([np.stack([start, top], 1), np.stack([end, top], 1),
                     np.stack([end, bottom], 1), np.stack([start, bottom], 1)], axis=1)


def _label_microbatches(
    ax: Axes, result: SimulationResult, colors: np.ndarray, on_light: np.ndarray, points_per_second: float
) -> None:
    """Write each bar's microbatch number inside it (on a patch of its colour, over any hatching),
    where the bar is wide enough for the text."""
    for ins, rank, start, end, color, light in zip(result.dag.instructions, result.dag.ranks.tolist(), result.start.tolist(),
                                                   result.end.tolist(), colors, on_light.tolist()):
        text = str(ins.microbatch)
        if (end - start) * points_per_second < len(text) * _DIGIT_WIDTH_PT + _LABEL_PADDING_PT:
            continue
        ax.text((start + end) / 2, rank, text, ha="center", va="center", fontsize=_LABEL_FONT_PT,
                color="black" if light else "white", bbox={"boxstyle": "square,pad=0.15", "facecolor": color, "edgecolor": "none"})


def _luminance(rgba: np.ndarray) -> np.ndarray:
    """Relative luminance of each sRGB(A) colour (rows of ``rgba``)."""
    rgb = rgba[:, :3]
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return linear @ np.array([0.2126, 0.7152, 0.0722])
