"""``perseus launch``: ``accelerate launch`` with Perseus enabled by a config file."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = """\
Run an Accelerate training job with Perseus: check the Perseus config file, set PERSEUS_CONFIG to
it (environment variables reach every worker) and hand every other argument, unchanged, to
`accelerate launch`. The training script enables Perseus with
`PerseusPlugin.from_env(accelerator)`. Equivalent to
`PERSEUS_CONFIG=perseus.yaml accelerate launch [accelerate launch arguments] SCRIPT [script arguments]`.
"""
USAGE = "perseus launch --perseus-config PATH [accelerate launch arguments] SCRIPT [script arguments]"


def register(commands: argparse._SubParsersAction) -> None:
    # Accelerate's own parser reads the arguments in `run`: here they are all kept, unparsed (no
    # option prefix, so that no argument, `--help` included, is taken for an option of this parser).
    parser = commands.add_parser(
        "launch", help="accelerate launch with Perseus enabled by a config file", usage=USAGE,
        description=DESCRIPTION, add_help=False, prefix_chars="+",
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="accelerate launch arguments, then the script and its own")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    launch(args.arguments)
    return 0


def launch(argv: Sequence[str]) -> None:
    """Validate ``--perseus-config``, export it as ``$PERSEUS_CONFIG``, and run ``accelerate launch``
    with the other arguments (those after the script belong to the script, its own
    ``--perseus-config`` included). Raises :class:`~perseus_lightning.runtime.config.ConfigError`
    for a missing or invalid config file."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    from perseus_lightning.integrations.accelerate import ENV_CONFIG
    from perseus_lightning.runtime.config import PerseusConfig

    parser = launch_command_parser()
    parser.prog, parser.usage, parser.description = "perseus launch", USAGE, DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # Accelerate's hides options of other groups
    parser.add_argument_group("Perseus").add_argument(
        "--perseus-config", type=Path, required=True, metavar="PATH",
        help=f"the Perseus YAML config (docs/configuration.md), exported as {ENV_CONFIG} to every worker",
    )
    args = parser.parse_args(list(argv))
    path = args.perseus_config.expanduser().resolve()
    del args.perseus_config
    PerseusConfig.from_yaml(path)  # a bad file fails here, once, rather than on every worker
    os.environ[ENV_CONFIG] = str(path)
    launch_command(args)
