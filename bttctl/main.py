"""`bttctl`: the command-line tool, in the style of ndctl.

Each verb lives in its own module with a `register(subparsers)` function; this file only
assembles them. Usage errors exit 64 (argparse's 2 would collide with check-namespace's
"repaired"); JSON goes to stdout, messages to stderr.
"""
import argparse
import os
import sys

from bttctl import check, namespace, replay, serve
from bttctl.exits import EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bttctl", description="Manage and serve BTT (sector mode) namespaces.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB",
                                parser_class=_Parser)
    serve.register(sub)
    namespace.register(sub)
    check.register(sub)
    replay.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    namespace.one_control(args)
    try:
        return args.func(args)
    except BrokenPipeError:  # `bttctl list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
