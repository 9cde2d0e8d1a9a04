"""The last step of both console scripts (``lfi`` in lfi.cli, ``python -m lfi.train`` in
lfi.train.cli): parse the arguments, run the chosen subcommand's ``func`` and turn the outcome into
an exit code. Kept apart from both so that the training layer need not import the console script."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parses argv (None: sys.argv[1:]) and returns the subcommand's exit code: its ``func(args)``
    result (None = 0); 2 with the help printed when no subcommand was given; 2 with
    ``lfi <command>: error: ...`` on stderr for an exception of one of the `errors` types; 130 on
    KeyboardInterrupt."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except errors as e:
        print(f"lfi {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
