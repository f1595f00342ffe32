"""Run the ``perseus`` command in-process, as the CLI tests do."""

from __future__ import annotations

import pytest

from perseus_lightning.cli.main import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit code, standard output and standard error of ``perseus *argv``."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's --help and usage errors
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
