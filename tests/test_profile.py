"""Profiles: Zeus CSV and JSON round trips, Pareto filtering, and every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perseus_lightning.core.errors import ProfileError
from perseus_lightning.core.profile import InstructionProfile, Profile

HEADER = "stage,instruction,frequency,time,energy\n"


def two_stage_csv(extra: str = "") -> str:
    rows = [
        (s, kind, f, t * (1410 / f) ** 0.8, t * (1410 / f) ** 0.8 * (100 + 250 * (f / 1410) ** 2))
        for s in range(2)
        for kind, t in (("forward", 0.05), ("backward", 0.1))
        for f in (1410, 1200, 1000)
    ]
    return HEADER + "".join(f"{s},{k},{f},{t!r},{e!r}\n" for s, k, f, t, e in rows) + extra


def write(tmp_path: Path, text: str, name: str = "profile.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str, name: str = "profile.csv") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(ProfileError) as info:
        Profile.load(path)
    message = str(info.value)
    assert str(path) in message, "the error names the file"
    assert "Fix:" in message, "the error says how to fix it"
    assert "\n" not in message, "the error is one line"
    return message


def test_reads_zeus_csv(tmp_path: Path) -> None:
    profile = Profile.load(write(tmp_path, two_stage_csv()))
    assert profile.num_stages == 2
    assert profile.kinds(0) == ("forward", "backward")
    assert profile.frequencies == (1000, 1200, 1410)
    assert profile.max_frequency == 1410
    assert profile.get(1, "backward").at(1410) == pytest.approx((0.1, 0.1 * 350))
    assert not profile.has_split_backward


def test_csv_and_json_round_trip(tmp_path: Path) -> None:
    profile = Profile.load(write(tmp_path, two_stage_csv()))
    for name in ("again.csv", "again.json"):
        profile.save(tmp_path / name)
        again = Profile.load(tmp_path / name)
        assert dict(again.items()).keys() == dict(profile.items()).keys()
        for key, prof in profile.items():
            other = again.get(*key)
            assert other.frequencies == prof.frequencies
            np.testing.assert_array_equal(other.time, prof.time)
            np.testing.assert_array_equal(other.energy, prof.energy)


def test_extra_columns_and_whitespace_are_accepted(tmp_path: Path) -> None:
    text = "stage, instruction, frequency, time, energy, note\n0,forward,1410,0.05,20,x\n0,backward,1410,0.1,40,y\n"
    assert Profile.load(write(tmp_path, text)).get(0, "backward").at(1410) == (0.1, 40.0)


def test_split_backward_profiles(tmp_path: Path) -> None:
    text = HEADER + "0,forward,1410,0.05,20\n0,backward_input,1410,0.05,20\n0,backward_weight,1410,0.04,16\n"
    assert Profile.load(write(tmp_path, text)).has_split_backward


def test_pareto_drops_dominated_clocks() -> None:
    # 900 MHz is slower than 1000 MHz and costs more energy: dominated.
    prof = InstructionProfile((900, 1000, 1200, 1410), np.array([0.2, 0.15, 0.12, 0.1]), np.array([30.0, 25.0, 27.0, 35.0]))
    assert prof.pareto_frequencies() == (1000, 1200, 1410)
    # Charging idle time at 100 W makes slow clocks cheaper relative to waiting: E - P t.
    # 1200: 27 - 12 = 15; 1000: 25 - 15 = 10; 1410: 35 - 10 = 25; 900: 30 - 20 = 10 (ties 1000, slower).
    assert prof.pareto_frequencies(p2p_power=100.0) == (1000, 1200, 1410)
    assert prof.pareto_frequencies(p2p_power=200.0) == (900, 1000, 1200, 1410)


def test_profile_pareto_keeps_max_clock_and_matches_shared_data(shared_profile_path: Path) -> None:
    profile = Profile.load(shared_profile_path)
    filtered = profile.pareto(83.64)
    assert filtered.max_frequency == profile.max_frequency
    for key, prof in filtered.items():
        original = profile.get(*key)
        assert set(prof.frequencies) <= set(original.frequencies)
        # No kept clock is dominated by any original clock (effective energy).
        cost = original.energy - 83.64 * original.time
        for f in prof.frequencies:
            t, e = original.at(f)
            c = e - 83.64 * t
            assert not np.any((original.time <= t) & (cost < c) | (original.time < t) & (cost <= c))
    # The lowest clocks are dominated in the measured data (design facts).
    assert 855 not in filtered.get(0, "forward").frequencies


# ---------------------------------------------------------------- bad input
def test_missing_column(tmp_path: Path) -> None:
    message = load_error(tmp_path, "stage,instruction,frequency,time\n0,forward,1410,0.05\n")
    assert "missing column(s) energy" in message
    assert "stage,instruction,frequency,time,energy" in message


def test_non_numeric_value(tmp_path: Path) -> None:
    message = load_error(tmp_path, two_stage_csv("1,forward,900,fast,20\n"))
    assert "row 13 (line 14)" in message
    assert "time 'fast' is not a number" in message


@pytest.mark.parametrize("value", ["nan", "NaN", "inf"])
def test_nan_or_infinite_value(tmp_path: Path, value: str) -> None:
    message = load_error(tmp_path, two_stage_csv(f"1,forward,900,0.07,{value}\n"))
    assert "row 13 (line 14)" in message
    assert "energy is" in message and "finite number" in message


def test_negative_values(tmp_path: Path) -> None:
    assert "energy is -5.0, negative" in load_error(tmp_path, two_stage_csv("1,forward,900,0.07,-5\n"))
    assert "time is -0.07, not positive" in load_error(tmp_path, two_stage_csv("1,forward,900,-0.07,5\n"))
    assert "stage is -1, a negative index" in load_error(tmp_path, two_stage_csv("-1,forward,900,0.07,5\n"))
    assert "frequency is -900 MHz" in load_error(tmp_path, two_stage_csv("1,forward,-900,0.07,5\n"))


def test_non_integer_stage_or_frequency(tmp_path: Path) -> None:
    assert "stage '1.5' is not an integer" in load_error(tmp_path, two_stage_csv("1.5,forward,900,0.07,5\n"))
    assert "frequency '900.5' is not an integer" in load_error(tmp_path, two_stage_csv("1,forward,900.5,0.07,5\n"))


def test_stage_without_forward_or_backward(tmp_path: Path) -> None:
    no_backward = HEADER + "0,forward,1410,0.05,20\n0,backward,1410,0.1,40\n1,forward,1410,0.05,20\n"
    assert "stage 1 has no backward rows" in load_error(tmp_path, no_backward)
    no_forward = HEADER + "0,forward,1410,0.05,20\n0,backward,1410,0.1,40\n1,backward,1410,0.1,40\n"
    assert "stage 1 has no forward rows" in load_error(tmp_path, no_forward)
    half_split = HEADER + "0,forward,1410,0.05,20\n0,backward_input,1410,0.05,20\n"
    assert "backward_input rows but no backward_weight rows" in load_error(tmp_path, half_split)


def test_missing_stage(tmp_path: Path) -> None:
    text = HEADER + "".join(f"{s},{k},1410,0.05,20\n" for s in (0, 1, 3) for k in ("forward", "backward"))
    message = load_error(tmp_path, text)
    assert "stage 2 is missing (stages present: 0-1, 3)" in message


def test_duplicate_rows(tmp_path: Path) -> None:
    message = load_error(tmp_path, two_stage_csv("0,forward,1200,0.06,20\n"))
    assert "row 13 (line 14): duplicates row 2 (line 3)" in message
    assert "stage 0, forward, 1200 MHz" in message


def test_unknown_instruction(tmp_path: Path) -> None:
    message = load_error(tmp_path, two_stage_csv("0,fwd,900,0.06,20\n"))
    assert "unknown instruction 'fwd'" in message
    assert "forward, backward, backward_input, backward_weight" in message


def test_stages_with_no_common_frequency(tmp_path: Path) -> None:
    text = HEADER + "".join(
        f"{s},{k},{f},0.05,20\n" for s, freqs in ((0, (1410, 1395)), (1, (1200, 1185))) for k in ("forward", "backward") for f in freqs
    )
    message = load_error(tmp_path, text)
    assert "no frequency in common" in message
    assert "stage 0: 1395-1410 MHz" in message and "stage 1: 1185-1200 MHz" in message


def test_empty_and_missing_files(tmp_path: Path) -> None:
    assert "has no data rows" in load_error(tmp_path, HEADER)
    with pytest.raises(ProfileError, match="no such profile file"):
        Profile.load(tmp_path / "absent.csv")


def test_json_errors_name_the_entry(tmp_path: Path) -> None:
    assert "not valid JSON" in load_error(tmp_path, "{", "p.json")
    assert "not a Perseus profile" in load_error(tmp_path, '{"rows": []}', "p.json")
    bad = '{"format": "perseus-profile", "version": 1, "instructions": [{"stage": 0, "instruction": "forward", "frequency": [1410, 1200], "time": [0.05, null], "energy": [20, 18]}]}'
    assert "instructions[0] point 1: time 'None' is not a number" in load_error(tmp_path, bad, "p.json")
    ragged = '{"format": "perseus-profile", "version": 1, "instructions": [{"stage": 0, "instruction": "forward", "frequency": [1410], "time": [0.05, 0.06], "energy": [20]}]}'
    assert "lists of equal length" in load_error(tmp_path, ragged, "p.json")


def test_pipeline_with_wrong_stage_count(tmp_path: Path) -> None:
    profile = Profile.load(write(tmp_path, two_stage_csv()))
    with pytest.raises(ProfileError, match=r"has 2 stages but the pipeline needs 3\. Fix: pass --stages 2"):
        profile.for_stages([0, 1, 2])


def test_profile_split_into_chunks_for_interleaving(tmp_path: Path) -> None:
    profile = Profile.load(write(tmp_path, two_stage_csv()))
    chunks = profile.for_stages([0, 1, 0, 1])  # two chunks per rank
    assert chunks.num_stages == 4
    assert chunks.get(2, "forward").at(1410) == pytest.approx(tuple(v / 2 for v in profile.get(0, "forward").at(1410)))
