"""The iteration time–energy frontier: every plan, the LP lower bound, the baseline and ``T*``."""

from __future__ import annotations

from pathlib import Path

from perseus_lightning.core.planner import Frontier

DPI = 150


def plot_frontier(frontier: Frontier, path: str | Path, title: str | None = None) -> Path:
    """Save energy against iteration time for every plan of ``frontier`` as a PNG; return the path."""
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    times = [p.iteration_time for p in frontier.plans]
    energies = [p.energy for p in frontier.plans]
    axes.plot(times, energies, "o-", markersize=3, color="tab:blue", label=f"Perseus plans ({len(frontier.plans)})")
    bounds = [(p.iteration_time, p.lower_bound) for p in frontier.plans if p.lower_bound is not None]
    if bounds:
        axes.plot(*zip(*bounds), "--", color="tab:gray", linewidth=1, label="LP lower bound (at each plan's deadline)")
    axes.plot([frontier.baseline_time], [frontier.baseline_energy], "*", markersize=12, color="tab:red",
              label="baseline: every instruction at max clock")
    fastest = frontier.fastest
    saving = 100 * (1 - fastest.energy / frontier.baseline_energy)
    axes.annotate(f"zero slowdown: -{saving:.1f} %", (fastest.iteration_time, fastest.energy),
                  xytext=(10, -4), textcoords="offset points", fontsize=8)
    axes.axvline(frontier.t_star, color="tab:green", linestyle=":", linewidth=1, label=f"T* = {frontier.t_star:.4f} s")
    schedule = frontier.dag.schedule
    axes.set_title(title or f"{schedule.name}: {schedule.num_ranks} stages x {schedule.num_microbatches} microbatches")
    axes.set_xlabel("iteration time (s)")
    axes.set_ylabel("iteration energy, all GPUs (J)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=DPI, format="png")
    return path
