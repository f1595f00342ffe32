"""Exceptions for bad user input.

Every message names where the problem is (file, row, stage or rank) and how to fix it.
The CLI turns these into a one-line reason and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class PerseusInputError(ValueError):
    """Base class for errors caused by bad input (profiles, schedules, plans)."""


class ProfileError(PerseusInputError):
    """A stage profile is malformed or incomplete."""


class ScheduleError(PerseusInputError):
    """A pipeline schedule is unknown, inconsistent, or cannot run."""


class PlanError(PerseusInputError):
    """A frequency plan does not fit the schedule or the profile."""


def read_json(path: Path, kind: str, error: type[PerseusInputError], fix: str) -> Any:
    """The JSON document at ``path``, a ``kind`` file ("plan", "frontier", ...); a missing or
    malformed file raises ``error`` ending in ``fix``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {kind} file. Fix: check the path, or {fix}.") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc}). Fix: {fix}.") from None
