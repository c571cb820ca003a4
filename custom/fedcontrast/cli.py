"""The ``fedcontrast`` command line.

Each area of the package contributes its own sub-commands through a module
with ``add_parser(subparsers)``; a sub-command sets ``func`` on its parser,
which is called with the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

#: Modules that contribute sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "fedcontrast.data.cli",
    "fedcontrast.demo",
    "fedcontrast.bench",
    "fedcontrast.deploy.cli",
)


class UserError(Exception):
    """An error caused by the user's input or environment; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="fedcontrast",
        description="Federated contrastive pre-training for cardiac MRI segmentation (NVFlare + MONAI).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedcontrast`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"fedcontrast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
