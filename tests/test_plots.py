"""Tests for the timeline and profile plots: valid PNGs, and that what is drawn matches the data."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.simulator import SimulationResult, simulate
from perseus_lightning.plots import plot_profile, plot_timeline
from perseus_lightning.plots.profile_curves import profile_figure, stage_groups
from perseus_lightning.plots.timeline import (
    FREQUENCY_COLORMAP,
    KIND_HATCHES,
    default_title,
    frequency_colors,
    timeline_figure,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
P2P_POWER = 10.0
# frequency -> (time s, energy J) of a forward. At P2P_POWER, 900 MHz is dominated by 1100 MHz (slower and
# costlier) and 1300 MHz by 1410 MHz.
FORWARD_POINTS = {900: (1.6, 130.0), 1100: (1.3, 100.0), 1300: (1.05, 125.0), 1410: (1.0, 120.0)}


def synthetic_profile(num_stages: int = 2, split_backward: bool = False, identical_stages: bool = False) -> Profile:
    """Backward costs twice the forward; stage ``s`` is ``1 + 0.1 s`` times slower unless ``identical_stages``."""
    backward_kinds = {"backward_input": 1.0, "backward_weight": 1.0} if split_backward else {"backward": 2.0}
    rows = []
    for stage in range(num_stages):
        stage_scale = 1.0 if identical_stages else 1.0 + 0.1 * stage
        for kind, kind_scale in {"forward": 1.0, **backward_kinds}.items():
            for freq, (time, energy) in FORWARD_POINTS.items():
                scale = stage_scale * kind_scale
                rows.append((stage, kind, freq, time * scale, energy * scale))
    return Profile.from_rows(rows, source="synthetic.csv")


def simulated(profile: Profile, schedule: str, stages: int, microbatches: int, mixed_clocks: bool = False) -> SimulationResult:
    """Simulate at max clock, or with node ``i`` at the profile's ``i % n``-th of ``n`` clocks."""
    dag = InstructionDAG.from_schedule(build_schedule(schedule, stages, microbatches))
    clocks = profile.frequencies
    plan = FrequencyPlan(tuple(clocks[node % len(clocks)] for node in range(dag.num_nodes))) if mixed_clocks else None
    return simulate(dag, profile, P2P_POWER, plan)


def read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    return imread(path)


def drawn_bars(result: SimulationResult) -> Counter:
    """Every bar of the timeline as ``(start, end, rank, rgba, hatch)``, read back from the figure."""
    ax = timeline_figure(result).axes[0]
    bars: Counter = Counter()
    for collection in ax.collections:
        for path, rgba in zip(collection.get_paths(), collection.get_facecolors()):
            xs, ys = path.vertices[:, 0], path.vertices[:, 1]
            bars[(round(xs.min(), 9), round(xs.max(), 9), round((ys.min() + ys.max()) / 2), tuple(np.round(rgba, 6)),
                  collection.get_hatch() or "")] += 1
    return bars


def test_importing_plots_does_not_load_matplotlib_and_plotting_avoids_pyplot(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        import perseus_lightning.plots as plots
        assert not any(m.startswith("matplotlib") for m in sys.modules), "matplotlib imported eagerly"
        from perseus_lightning.core.profile import Profile
        profile = Profile.from_rows([(0, "forward", 1410, 1.0, 10.0), (0, "backward", 1410, 2.0, 20.0)])
        plots.plot_profile(profile, {str(tmp_path / "p.png")!r})
        assert "matplotlib" in sys.modules
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_timeline_is_a_png_of_the_expected_size(tmp_path: Path) -> None:
    result = simulated(synthetic_profile(num_stages=5), "1f1b", 5, 6)
    path = plot_timeline(result, tmp_path / "timeline.png")
    assert path == tmp_path / "timeline.png"
    height, width, _ = read_png(path).shape
    assert width == 1800  # 12 in at 150 dpi
    assert height == round((0.65 + 0.55 + 5 * 0.42) * 150)  # margins and a 0.42 in row per rank


def test_timelines_of_different_plans_differ(tmp_path: Path) -> None:
    profile = synthetic_profile()
    max_clock = read_png(plot_timeline(simulated(profile, "1f1b", 2, 4), tmp_path / "max.png"))
    lowered = read_png(plot_timeline(simulated(profile, "1f1b", 2, 4, mixed_clocks=True), tmp_path / "low.png"))
    assert max_clock.shape == lowered.shape
    assert not np.array_equal(max_clock, lowered)


def test_frequency_colors_span_the_colormap() -> None:
    from matplotlib import colormaps

    cmap = colormaps[FREQUENCY_COLORMAP]
    colors = frequency_colors(np.array([1410, 900, 1155, 900]))
    np.testing.assert_allclose(colors[0], cmap(1.0))
    np.testing.assert_allclose(colors[1], cmap(0.0))
    np.testing.assert_allclose(colors[3], cmap(0.0))
    np.testing.assert_allclose(colors[2], cmap(0.5))
    assert not np.allclose(colors[0], colors[1])


def test_a_single_frequency_gets_the_colormaps_high_end() -> None:
    from matplotlib import colormaps

    colors = frequency_colors(np.array([1410, 1410, 1410]))
    np.testing.assert_allclose(colors, np.tile(colormaps[FREQUENCY_COLORMAP](1.0), (3, 1)))


@pytest.mark.parametrize("mixed_clocks", [False, True])
def test_every_instruction_is_one_bar_at_its_time_rank_colour_and_kind(mixed_clocks: bool) -> None:
    result = simulated(synthetic_profile(num_stages=3), "1f1b", 3, 5, mixed_clocks)
    colors = frequency_colors(result.frequencies)
    expected = Counter(
        (round(s, 9), round(e, 9), int(r), tuple(np.round(c, 6)), KIND_HATCHES[ins.kind])
        for ins, r, s, e, c in zip(result.dag.instructions, result.dag.ranks, result.start, result.end, colors)
    )
    assert drawn_bars(result) == expected


def test_split_backward_kinds_get_their_own_hatch_and_legend_entry() -> None:
    result = simulated(synthetic_profile(split_backward=True), "zero-bubble", 2, 4)
    ax = timeline_figure(result).axes[0]
    hatches = {collection.get_hatch() or "" for collection in ax.collections}
    assert hatches == {KIND_HATCHES["forward"], KIND_HATCHES["backward_input"], KIND_HATCHES["backward_weight"]}
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[:3] == ["forward", "backward (input grad)", "backward (weight grad)"]
    assert labels[3].startswith("iteration time")


def test_rank_zero_is_the_top_row() -> None:
    ax = timeline_figure(simulated(synthetic_profile(num_stages=3), "1f1b", 3, 3)).axes[0]
    assert ax.yaxis_inverted()
    assert [label.get_text() for label in ax.get_yticklabels()] == ["rank 0", "rank 1", "rank 2"]


def test_iteration_time_is_marked_by_a_dashed_line() -> None:
    result = simulated(synthetic_profile(), "gpipe", 2, 3, mixed_clocks=True)
    ax = timeline_figure(result).axes[0]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1
    np.testing.assert_allclose(dashed[0].get_xdata(), [result.iteration_time] * 2)
    assert ax.get_xlim()[1] > result.iteration_time


def test_microbatch_numbers_are_written_when_bars_are_wide_enough() -> None:
    result = simulated(synthetic_profile(), "1f1b", 2, 4)
    texts = sorted(text.get_text() for text in timeline_figure(result).axes[0].texts)
    assert texts == sorted(str(ins.microbatch) for ins in result.dag.instructions)


def test_microbatch_numbers_are_skipped_when_bars_are_too_narrow() -> None:
    result = simulated(synthetic_profile(num_stages=8), "1f1b", 8, 96)
    ax = timeline_figure(result).axes[0]
    assert len(ax.texts) == 0
    assert sum(len(collection.get_paths()) for collection in ax.collections) == result.dag.num_nodes


def test_default_title_names_schedule_size_time_and_energy() -> None:
    result = simulated(synthetic_profile(), "1f1b", 2, 4)
    title = default_title(result)
    assert title.startswith("1f1b: 2 stages")
    assert "4 microbatches" in title
    assert f"{result.iteration_time:.3f} s" in title
    assert f"{result.energy / 1e3:.2f} kJ" in title
    figure_texts = [text.get_text() for text in timeline_figure(result, title="custom").texts]
    assert figure_texts == ["custom"]


def test_profile_plot_is_a_png_of_the_expected_size(tmp_path: Path) -> None:
    path = plot_profile(synthetic_profile(), tmp_path / "profile.png", p2p_power=P2P_POWER)
    height, width, _ = read_png(path).shape
    assert (width, height) == (1800, 720)  # 12 x 4.8 in at 150 dpi


def test_profile_plot_marks_pareto_and_dominated_frequencies() -> None:
    profile = synthetic_profile()
    time_ax, energy_ax = profile_figure(profile, p2p_power=P2P_POWER).axes
    for ax, column in ((time_ax, 0), (energy_ax, 1)):
        dominated = np.concatenate([line.get_xdata() for line in ax.get_lines() if line.get_marker() == "x"])
        pareto = np.concatenate([line.get_xdata() for line in ax.get_lines() if line.get_marker() == "o"])
        assert sorted(dominated) == [900] * 4 + [1300] * 4  # for each of 2 stages x 2 kinds
        assert sorted(pareto) == [1100] * 4 + [1410] * 4
        stage1_backward_900 = FORWARD_POINTS[900][column] * 1.1 * 2 * (1e3 if column == 0 else 1)
        dominated_values = np.concatenate([line.get_ydata() for line in ax.get_lines() if line.get_marker() == "x"])
        assert np.isclose(dominated_values, stage1_backward_900).any()


def test_profile_plot_without_blocking_power_draws_only_curves() -> None:
    time_ax, energy_ax = profile_figure(synthetic_profile(num_stages=3)).axes
    for ax in (time_ax, energy_ax):
        assert len(ax.get_lines()) == 3 * 2  # a line per stage and kind
        assert {line.get_marker() for line in ax.get_lines()} == {"None"}


def test_identical_stages_are_drawn_once_with_a_combined_label() -> None:
    profile = synthetic_profile(num_stages=4, identical_stages=True)
    assert stage_groups(profile) == [(0, 1, 2, 3)]
    figure = profile_figure(profile)
    assert len(figure.axes[0].get_lines()) == 2
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["stages 0\u20133", "forward", "backward"]


def test_real_profile_plots(shared_profile_path: Path, tmp_path: Path) -> None:
    a100_profile = Profile.load(shared_profile_path)  # the fixture skips when ../shared/data is absent
    result = simulate(InstructionDAG.from_schedule(build_schedule("1f1b", 8, 12)), a100_profile, 83.64)
    height, width, _ = read_png(plot_timeline(result, tmp_path / "timeline.png")).shape
    assert (width, height) == (1800, round((0.65 + 0.55 + 8 * 0.42) * 150))
    height, width, _ = read_png(plot_profile(a100_profile, tmp_path / "profile.png", p2p_power=83.64)).shape
    assert (width, height) == (1800, 720)
    legend = [text.get_text() for text in profile_figure(a100_profile, 83.64).legends[0].get_texts()]
    assert legend[:2] == ["stages 0\u20136", "stage 7"]  # stages 0-6 share one profile, the last differs
