"""Time and energy of every stage's instructions against SM frequency, with Pareto-optimal clocks marked."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from perseus_lightning.core.profile import BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, Profile

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KIND_LINESTYLES: dict[str, str] = {FORWARD: "-", BACKWARD: "--", BACKWARD_INPUT: "-.", BACKWARD_WEIGHT: ":"}
DPI = 150


def plot_profile(profile: Profile, path: str | Path, p2p_power: float | None = None) -> Path:
    """Save time and energy against frequency of every stage and instruction kind as a PNG; return the path.

    With ``p2p_power`` (the blocking power, W), each instruction's Pareto-optimal frequencies
    (:meth:`InstructionProfile.pareto_frequencies`) get filled dots and the dominated ones crosses.
    """
    path = Path(path)
    profile_figure(profile, p2p_power).savefig(path, dpi=DPI, format="png")
    return path


def profile_figure(profile: Profile, p2p_power: float | None = None) -> Figure:
    """The :func:`plot_profile` chart as a :class:`matplotlib.figure.Figure` (no pyplot involved)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(12.0, 4.8), layout="constrained")
    time_ax, energy_ax = fig.subplots(1, 2)
    groups = stage_groups(profile)
    group_colors = _group_colors(len(groups))
    for stages, color in zip(groups, group_colors):
        for kind in profile.kinds(stages[0]):
            prof = profile.get(stages[0], kind)
            freqs = np.asarray(prof.frequencies)
            pareto = np.isin(freqs, prof.pareto_frequencies(p2p_power)) if p2p_power is not None else None
            for ax, values in ((time_ax, prof.time * 1e3), (energy_ax, prof.energy)):
                ax.plot(freqs, values, color=color, linestyle=KIND_LINESTYLES[kind], linewidth=1.3)
                if pareto is not None:
                    ax.plot(freqs[pareto], values[pareto], "o", color=color, markersize=3.5)
                    ax.plot(freqs[~pareto], values[~pareto], "x", color=color, markersize=5, markeredgewidth=1.2)
    for ax, label in ((time_ax, "time per microbatch (ms)"), (energy_ax, "energy per microbatch (J)")):
        ax.set_xlabel("SM frequency (MHz)")
        ax.set_ylabel(label)
        ax.grid(color="0.9", linewidth=0.6)
    time_ax.set_title("Time", loc="left", fontweight="bold")
    energy_ax.set_title("Energy", loc="left", fontweight="bold")

    handles = [Line2D([], [], color=color, linewidth=2, label=_stages_label(stages)) for stages, color in zip(groups, group_colors)]
    present = {kind for (_, kind), _ in profile.items()}
    handles += [Line2D([], [], color="0.3", linestyle=style, label=kind.replace("_", " "))
                for kind, style in KIND_LINESTYLES.items() if kind in present]
    if p2p_power is not None:
        handles += [
            Line2D([], [], color="0.3", marker="o", linestyle="none", markersize=4, label=f"Pareto-optimal\n(P_block = {p2p_power:g} W)"),
            Line2D([], [], color="0.3", marker="x", linestyle="none", markersize=5, label="dominated"),
        ]
    fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8)
    fig.suptitle(f"Stage profile: {Path(profile.source).name}", x=0.01, ha="left", fontsize=11, fontweight="bold")
    return fig


def stage_groups(profile: Profile) -> list[tuple[int, ...]]:
    """Stages with identical profiles, grouped so that each group is drawn (and labelled) once."""
    groups: dict[tuple, list[int]] = {}
    for stage in range(profile.num_stages):
        key = []
        for kind in profile.kinds(stage):
            prof = profile.get(stage, kind)
            key.append((kind, prof.frequencies, prof.time.tobytes(), prof.energy.tobytes()))
        groups.setdefault(tuple(key), []).append(stage)
    return [tuple(stages) for stages in groups.values()]


def _stages_label(stages: tuple[int, ...]) -> str:
    """``(3,)`` -> ``"stage 3"``, ``(0, 1, 2)`` -> ``"stages 0-2"``, ``(0, 2)`` -> ``"stages 0, 2"``."""
    if len(stages) == 1:
        return f"stage {stages[0]}"
    if stages == tuple(range(stages[0], stages[-1] + 1)):
        return f"stages {stages[0]}\u2013{stages[-1]}"
    return "stages " + ", ".join(map(str, stages))


def _group_colors(count: int) -> list[tuple[float, float, float, float]]:
    """A distinct colour per stage group: ``tab10`` up to 10 groups, evenly spaced ``viridis`` beyond."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.95, count)]
