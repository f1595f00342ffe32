"""Entry point of the ``perseus`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from perseus_lightning.cli import demo, doctor, launch, plan, reset, show, simulate
from perseus_lightning.core.errors import PerseusInputError
from perseus_lightning.gpu.device import GPUControlError

DESCRIPTION = """\
Perseus removes energy bloat from pipeline-parallel training: it slows the GPU clock of
forward and backward computations that are off the critical path, so an iteration takes
the same time with less energy.

Profiles give each stage's forward and backward time (s) and energy (J) per SM clock (MHz),
in the Zeus CSV format: stage,instruction,frequency,time,energy.
"""

EPILOG = """\
examples:
  perseus demo
  perseus show gpt3+a100.csv --plot profile.png
  perseus simulate gpt3+a100.csv --stages 8 --microbatches 12 --p2p-power 83.64 --json
  perseus simulate gpt3+a100.csv --microbatches 12 --p2p-power 83.64 --timeline timeline.png
  perseus plan gpt3+a100.csv --microbatches 12 --p2p-power 83.64 --output frontier.json --plot frontier.png
  perseus simulate gpt3+a100.csv --microbatches 12 --p2p-power 83.64 --frontier frontier.json \
      --pipelines 16 --straggler-slowdown 1.2 --json
  perseus doctor
  perseus doctor --json --measure-lock-latency
  perseus reset --all
  perseus launch --perseus-config perseus.yaml --multi_gpu --num_processes 2 train.py
"""


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="perseus", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineErrorParser)
    for module in (demo, doctor, plan, reset, simulate, show, launch):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PerseusInputError, GPUControlError) as exc:
        print(f"perseus {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `perseus simulate ... --json | head`
        return 0
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130 as a shell reports SIGINT
        print(f"perseus {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
