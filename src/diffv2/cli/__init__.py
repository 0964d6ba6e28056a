"""The ``diffv2`` command line. Each subcommand lives in its own module with ``add_parser`` + ``run``."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import DiffV2Error
from . import compare, convert, data, eval_command, evaluate, generate, inspect, models, perplexity, serve, train


class _Parser(argparse.ArgumentParser):
    """Every ``--long-option`` also answers to ``--long_option`` (and the reverse): the Python keywords and
    config fields are spelled with underscores, shell habits with dashes. Subcommand parsers inherit it."""

    def add_argument(self, *names: str, **kwargs):  # type: ignore[override]
        alternates = [
            "--" + (n[2:].replace("-", "_") if "-" in n[2:] else n[2:].replace("_", "-"))
            for n in names
            if n.startswith("--")
        ]
        extra = [a for a in dict.fromkeys(alternates) if a not in names]
        return super().add_argument(*names, *extra, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        """A bad flag is one line, like every other error (argparse would print the usage first)."""
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffv2", description="DIFF V2 / DIFF V1 / baseline language models")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("--version", action="version", version=f"diffv2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    models.add_parser(sub)
    data.add_parser(sub)
    train.add_parser(sub)
    generate.add_parser(sub)
    convert.add_parser(sub)
    eval_command.add_parser(sub)
    evaluate.add_parser(sub)
    perplexity.add_parser(sub)
    compare.add_parser(sub)  # registers `compare` and `report`
    inspect.add_parser(sub)
    serve.add_parser(sub)
    return parser


def one_line(text: object) -> str:
    """A message on one line (a terminal line per error, whatever a library put in its text)."""
    return " ".join(str(text).split("\n")).strip()


def torch_oom() -> type[BaseException]:
    """torch's out-of-memory error when torch is already loaded (it is not imported for this), else MemoryError."""
    torch = sys.modules.get("torch")
    return getattr(torch, "OutOfMemoryError", MemoryError) if torch is not None else MemoryError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DiffV2Error as err:  # user-fixable: one line, no traceback
        if args.debug:
            raise
        print(f"diffv2: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffv2: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`diffv2 models | head`): nothing left to say to it
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- so the interpreter's final flush finds no pipe
        return 0
    except (MemoryError, torch_oom()) as err:  # a size the machine cannot hold (batch, model, context)
        if args.debug:
            raise
        print(f"diffv2: error: out of memory ({one_line(err)[:200]}); use smaller sizes", file=sys.stderr)
        return 1
    except OSError as err:  # the system refused (permission, disk full, a vanished file): its own words
        if args.debug:
            raise
        where = f"{err.filename}: " if err.filename is not None else ""
        print(f"diffv2: error: {where}{one_line(err.strerror or err)}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug, not bad input: say so on one line; --debug shows where
        if args.debug:
            raise
        bug = f"{type(err).__name__}: {one_line(err)[:300]}"
        print(f"diffv2: error: internal error ({bug}); please report it with `diffv2 --debug ...`", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
