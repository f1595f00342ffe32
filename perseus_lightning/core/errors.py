"""Exceptions for bad user input.

Every message names where the problem is (file, row, stage or rank) and how to fix it.
The CLI turns these into a one-line reason and exit code 2.
"""

from __future__ import annotations


class PerseusInputError(ValueError):
    """Base class for errors caused by bad input (profiles, schedules, plans)."""


class ProfileError(PerseusInputError):
    """A stage profile is malformed or incomplete."""


class ScheduleError(PerseusInputError):
    """A pipeline schedule is unknown, inconsistent, or cannot run."""


class PlanError(PerseusInputError):
    """A frequency plan does not fit the schedule or the profile."""
