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
from pathlib import Path

#: Modules that contribute sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "fedcontrast.data.cli",
    "fedcontrast.demo",
    "fedcontrast.bench",
    "fedcontrast.deploy.cli",
)


class UserError(Exception):
    """An error caused by the user's input or environment; printed without a traceback."""


#: Options that name a folder a command (or a job script) writes, wherever they appear.
OUTPUT_FOLDER_OPTIONS: tuple[str, ...] = ("out", "workspace", "workdir", "output", "export")


def check_output_folders(args: argparse.Namespace) -> None:
    """Refuse an output folder option (:data:`OUTPUT_FOLDER_OPTIONS`) that names an existing file.

    Raises:
        UserError: one line naming the option and the file.
    """
    for name in OUTPUT_FOLDER_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, Path) and value.exists() and not value.is_dir():
            raise UserError(
                f"--{name} {value}: an existing file, not a folder; name a new or existing folder"
            )


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; everything after a ``--`` goes to the command's ``job_args``.

    The options of a job script are split off before parsing: argparse alone cannot give them
    to a command that also has a positional argument (``fedcontrast job export fcl -- ...``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    passthrough = argv[split + 1 :]
    if passthrough:
        if not hasattr(args, "job_args"):
            parser.error(f"{args.command} takes no options after '--'")
        args.job_args = [*args.job_args, *passthrough]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedcontrast`` console script."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        check_output_folders(args)
        return int(args.func(args) or 0)
    except (UserError, OSError, ValueError) as exc:  # OSError: e.g. a folder that cannot be made
        if args.verbose:
            raise
        print(f"fedcontrast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
