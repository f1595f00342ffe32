"""The Perseus YAML config: defaults, validation messages, the ``perseus:`` wrapper, round trips, replace."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import yaml

from perseus_lightning.core.errors import PerseusInputError
from perseus_lightning.runtime.config import (
    DEFAULT_CACHE_DIR,
    MODES,
    ConfigError,
    EmulationConfig,
    PerseusConfig,
    ProfilingConfig,
    StragglerConfig,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def write(tmp_path: Path, text: str, name: str = "perseus.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(data: object, source: str = "perseus.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        PerseusConfig.from_mapping(data, source)  # type: ignore[arg-type]
    return str(info.value)


# --------------------------------------------------------------------------- reading files
def test_defaults() -> None:
    config = PerseusConfig()
    assert (config.mode, config.gpu_backend, config.max_slowdown, config.blocking_power) == ("apply", "auto", 1.2, None)
    assert config.cache_dir == os.path.expanduser(DEFAULT_CACHE_DIR)
    assert config.straggler == StragglerConfig(0.05, 3, 0.02)
    assert config.profiling == ProfilingConfig(None, 4)
    assert config.emulation == EmulationConfig((), 1.0, None)


def test_full_yaml_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
mode: observe
gpu_backend: emulated
cache_dir: ~/perseus-cache
warmup_iterations: 0
blocking_power: 83.64
max_slowdown: 1
profiling: {max_clocks: 8, iterations_per_clock: 1}
straggler:
  threshold: 0.1
  patience: 5
  recovery: 0.03
emulation:
  straggler_ranks: [1, 3]
  straggler_slowdown: 1.2
  straggler_iterations: [10, 20]
  time_scale: 1.5
""")
    config = PerseusConfig.from_yaml(path)
    assert config.mode == "observe" and config.gpu_backend == "emulated"
    assert config.cache_dir == os.path.join(os.path.expanduser("~"), "perseus-cache")
    assert config.warmup_iterations == 0 and config.blocking_power == 83.64
    assert config.max_slowdown == 1.0 and isinstance(config.max_slowdown, float)
    assert config.profiling == ProfilingConfig(8, 1)
    assert config.straggler == StragglerConfig(0.1, 5, 0.03)
    assert config.emulation == EmulationConfig((1, 3), 1.2, (10, 20), time_scale=1.5)
    assert isinstance(config.emulation.straggler_ranks, tuple)


def test_perseus_wrapper_in_a_bigger_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
trainer: {max_epochs: 3}
perseus:
  mode: off
  straggler: {patience: 4}
""")
    config = PerseusConfig.from_yaml(path)
    assert config.mode == "off" and config.straggler.patience == 4


def test_wrapper_errors_name_the_wrapped_key(tmp_path: Path) -> None:
    path = write(tmp_path, "perseus:\n  straggler:\n    patience: 0\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: perseus.straggler.patience: is 0, must be >= 1. Fix:")):
        PerseusConfig.from_yaml(path)


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "perseus:\n", "straggler:\n"])
def test_empty_file_or_section_gives_defaults(tmp_path: Path, text: str) -> None:
    assert PerseusConfig.from_yaml(write(tmp_path, text)) == PerseusConfig()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: no such config file. Fix: check the path")):
        PerseusConfig.from_yaml(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read the config file")):
        PerseusConfig.from_yaml(tmp_path)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "mode: apply\nstraggler:\n  threshold: 0.05\n patience: 3\n")
    with pytest.raises(ConfigError) as info:
        PerseusConfig.from_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 4, column 2: not valid YAML (")
    assert "Fix: fix the syntax there" in message


@pytest.mark.parametrize(("text", "got"), [("- mode\n- apply\n", "['mode', 'apply'] (list)"), ("apply\n", "'apply' (str)")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: top level: expected a mapping of settings, got {got}. Fix:")):
        PerseusConfig.from_yaml(path)


def test_wrapped_section_must_be_a_mapping() -> None:
    assert error_of({"perseus": [1]}).startswith("perseus.yaml: perseus: expected a mapping of settings, got [1] (list).")


# --------------------------------------------------------------------------- validation messages
def test_unknown_key_suggests_the_closest() -> None:
    assert error_of({"mdoe": "apply"}) == (
        "perseus.yaml: mdoe: unknown key. Fix: did you mean 'mode'? Valid keys here: mode, gpu_backend, cache_dir, "
        "warmup_iterations, baseline_iterations, deploy_iterations, blocking_power, max_slowdown, profiling, "
        "straggler, emulation."
    )


def test_unknown_nested_key_and_no_close_match() -> None:
    assert error_of({"straggler": {"threshhold": 0.1}}).startswith(
        "perseus.yaml: straggler.threshhold: unknown key. Fix: did you mean 'threshold'?"
    )
    assert error_of({"profiling": {"xyz": 1}}) == (
        "perseus.yaml: profiling.xyz: unknown key. Fix: Valid keys here: max_clocks, iterations_per_clock."
    )


def test_unknown_mode_and_backend_list_the_valid_ones() -> None:
    assert error_of({"mode": "aply"}) == (
        "perseus.yaml: mode: unknown mode 'aply'. Fix: use one of apply, observe, off (did you mean 'apply'?)."
    )
    assert error_of({"gpu_backend": "cuda"}) == (
        "perseus.yaml: gpu_backend: unknown gpu_backend 'cuda'. Fix: use one of auto, nvml, emulated."
    )
    assert error_of({"mode": True}).startswith("perseus.yaml: mode: expected one of apply, observe, off, got True (bool).")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"warmup_iterations": "two"},
         "warmup_iterations: expected a whole number, got 'two' (str). Fix: set it to a whole number >= 0."),
        ({"baseline_iterations": 2.5}, "baseline_iterations: expected a whole number, got 2.5 (float)."),
        ({"deploy_iterations": True}, "deploy_iterations: expected a whole number, got True (bool)."),
        ({"max_slowdown": "fast"}, "max_slowdown: expected a number, got 'fast' (str). Fix: set it to a number >= 1, e.g. 1.2."),
        ({"blocking_power": [80]}, "blocking_power: expected a number, got [80] (list)."),
        ({"cache_dir": 3}, "cache_dir: expected a path, got 3 (int). Fix: give a directory or a .json file, or null"),
        ({"cache_dir": " "}, "cache_dir: is empty."),
        ({"profiling": 4}, "profiling: expected a mapping of settings, got 4 (int)."),
        ({"emulation": {"straggler_ranks": 1}}, "emulation.straggler_ranks: expected a list of ranks, got 1 (int)."),
        ({"emulation": {"straggler_ranks": [0, "1"]}}, "emulation.straggler_ranks[1]: expected a whole number, got '1' (str)."),
        ({"emulation": {"straggler_iterations": 5}},
         "emulation.straggler_iterations: expected two iterations [start, stop), got 5 (int)."),
    ],
)
def test_wrong_types(data: dict, message: str) -> None:
    assert error_of(data).startswith(f"perseus.yaml: {message}")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"warmup_iterations": -1}, "warmup_iterations: is -1, must be >= 0."),
        ({"baseline_iterations": 0}, "baseline_iterations: is 0, must be >= 1."),
        ({"deploy_iterations": 0}, "deploy_iterations: is 0, must be >= 1."),
        ({"blocking_power": 0}, "blocking_power: is 0, must be > 0. Fix: set it to a number > 0, e.g. 83.64."),
        ({"blocking_power": float("nan")}, "blocking_power: is nan, must be > 0."),
        ({"max_slowdown": 0.9}, "max_slowdown: is 0.9, must be >= 1."),
        ({"profiling": {"max_clocks": 0}}, "profiling.max_clocks: is 0, must be >= 1."),
        ({"profiling": {"iterations_per_clock": 0}}, "profiling.iterations_per_clock: is 0, must be >= 1."),
        ({"straggler": {"threshold": 0}}, "straggler.threshold: is 0, must be > 0."),
        ({"straggler": {"patience": 0}}, "straggler.patience: is 0, must be >= 1."),
        ({"straggler": {"recovery": -0.01}}, "straggler.recovery: is -0.01, must be >= 0."),
        ({"straggler": {"threshold": 0.02, "recovery": 0.02}},
         ("straggler.recovery: is 0.02, must be below threshold (0.02) or a straggler episode could not end. "
          "Fix: set recovery between 0 and threshold, e.g. recovery 0.01 for threshold 0.02.")),
        ({"emulation": {"straggler_slowdown": 0.5}}, "emulation.straggler_slowdown: is 0.5, must be >= 1."),
        ({"emulation": {"time_scale": 0.8}}, "emulation.time_scale: is 0.8, must be >= 1."),
        ({"emulation": {"straggler_ranks": [-1]}}, "emulation.straggler_ranks[0]: is -1, must be >= 0."),
        ({"emulation": {"straggler_ranks": [2, 2]}},
         "emulation.straggler_ranks: lists a rank twice: [2, 2]. Fix: list each rank once."),
        ({"emulation": {"straggler_iterations": [5, 5]}},
         "emulation.straggler_iterations: [5, 5) is empty: stop must be after start."),
    ],
)
def test_out_of_range(data: dict, message: str) -> None:
    assert error_of(data).startswith(f"perseus.yaml: {message}")


def test_every_error_ends_with_a_fix() -> None:
    message = error_of({"straggler": {"patience": -3}})
    assert re.fullmatch(r"perseus\.yaml: straggler\.patience: .+\. Fix: .+\.", message)


def test_yaml_exponent_gotcha_is_explained(tmp_path: Path) -> None:
    path = write(tmp_path, "straggler:\n  threshold: 5e-2\n")
    with pytest.raises(ConfigError, match=re.escape("write 5.0e-2")):
        PerseusConfig.from_yaml(path)
    assert PerseusConfig.from_yaml(write(tmp_path, "straggler:\n  threshold: 5.0e-2\n")).straggler.threshold == 0.05


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match=re.escape("StragglerConfig: patience: is 0, must be >= 1.")):
        StragglerConfig(patience=0)
    with pytest.raises(ConfigError, match=re.escape("PerseusConfig: mode: unknown mode 'Apply'")):
        PerseusConfig(mode="Apply")
    with pytest.raises(ConfigError, match=re.escape("PerseusConfig: straggler.patience: is 0")):
        PerseusConfig(straggler={"patience": 0})  # type: ignore[arg-type]


def test_config_error_is_an_input_error_and_pickles() -> None:
    with pytest.raises(PerseusInputError) as info:
        PerseusConfig(max_slowdown=0.5)
    copy = pickle.loads(pickle.dumps(info.value))
    assert isinstance(copy, ConfigError) and str(copy) == str(info.value) and copy.key == "max_slowdown"


# --------------------------------------------------------------------------- round trip and replace
def test_to_dict_round_trips_through_yaml(tmp_path: Path) -> None:
    config = PerseusConfig(
        mode="observe", cache_dir=None, blocking_power=70.38,
        profiling=ProfilingConfig(max_clocks=6), emulation=EmulationConfig((2,), 1.3, (5, 9)),
    )
    plain = config.to_dict()
    assert plain["emulation"] == {
        "straggler_ranks": [2], "straggler_slowdown": 1.3, "straggler_iterations": [5, 9], "time_scale": 1.0,
    }
    path = write(tmp_path, yaml.safe_dump(plain))
    assert PerseusConfig.from_yaml(path) == config
    assert PerseusConfig.from_mapping({"perseus": plain}) == config


def test_replace_merges_sections_and_validates() -> None:
    config = PerseusConfig(straggler=StragglerConfig(threshold=0.1, patience=4))
    changed = config.replace(mode="off", straggler={"patience": 6})
    assert changed.mode == "off" and changed.straggler == StragglerConfig(threshold=0.1, patience=6)
    assert config.mode == "apply" and config.straggler.patience == 4  # the original is unchanged
    whole = config.replace(straggler=StragglerConfig(patience=2))
    assert whole.straggler == StragglerConfig(patience=2)
    assert config.replace(emulation={"straggler_ranks": [0]}).emulation.straggler_ranks == (0,)
    with pytest.raises(ConfigError, match=re.escape("PerseusConfig.replace: straggler.recovery: is 0.2, must be below")):
        config.replace(straggler={"recovery": 0.2})
    unknown = "PerseusConfig.replace: max_slowdwn: unknown key. Fix: did you mean 'max_slowdown'?"
    with pytest.raises(ConfigError, match=re.escape(unknown)):
        config.replace(max_slowdwn=1.5)


def test_modes() -> None:
    assert MODES == ("apply", "observe", "off")
    assert [PerseusConfig(mode=m).mode for m in MODES] == list(MODES)


@pytest.mark.parametrize("text", ["mode: off", "mode: false", "mode: 'off'"])
def test_bare_yaml_off_is_off(tmp_path: Path, text: str) -> None:
    assert PerseusConfig.from_yaml(write(tmp_path, text)).mode == "off"


# --------------------------------------------------------------------------- docs
def test_docs_list_every_key_with_its_default() -> None:
    text = DOCS.read_text()
    defaults = PerseusConfig().to_dict()
    defaults["cache_dir"] = DEFAULT_CACHE_DIR
    for key, value in defaults.items():
        for name, default in (value.items() if isinstance(value, dict) else [(None, value)]):
            row = f"| `{key}.{name}` |" if name else f"| `{key}` |"
            assert row in text, row
            line = next(line for line in text.splitlines() if line.startswith(row))
            shown = "null" if default is None else default
            assert f"`{shown}`" in line, (row, shown)


def test_docs_example_parses() -> None:
    example = DOCS.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    config = PerseusConfig.from_mapping(yaml.safe_load(example), "docs/configuration.md")
    assert config.emulation == EmulationConfig((1,), 1.2, (100, 200))
