"""The ``edgeconvert`` command line: wires the subcommand modules together.

Each subcommand group lives in its own module, which exposes ``register(commands)``: it adds
its parser to the ``commands`` sub-parsers and sets ``handler`` (``args -> exit status``).
This module only builds the parser and maps errors to exit statuses: 0 on success, 2 on bad
usage or bad input, 1 on any other failure, and one ``edgeconvert: error: ...`` line instead of
a traceback (``-v`` logs the traceback of an unexpected failure).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

from . import fp16, hub, publish, quantize, tflite, validate
from .errors import ConvertError

log = logging.getLogger("edgeconvert")

#: The subcommand modules, in the order ``--help`` lists them.
COMMAND_MODULES = (quantize, fp16, tflite, validate, hub, publish)


def build_parser() -> argparse.ArgumentParser:
    """The full ``edgeconvert`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="edgeconvert",
        description="Quantise, convert and validate models for edgeagent boxes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


@contextlib.contextmanager
def _logging_to_stderr(verbose: bool) -> Iterator[None]:
    # Only our own logger, and only while the command runs: main() may run many times in one
    # process (tests, notebooks), with sys.stderr replaced in between, and the library functions
    # called directly should log through the caller's configuration.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edgeconvert: %(message)s"))
    log.addHandler(handler)
    level, propagate = log.level, log.propagate
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Some of onnxruntime's modules configure the root logger; without this every line would
    # print twice.
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edgeconvert`` with ``argv`` (default: the process arguments).

    Returns:
        The exit status.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad usage (2)
        return exc.code if isinstance(exc.code, int) else 2
    with _logging_to_stderr(args.verbose):
        try:
            return int(args.handler(args))
        except ConvertError as exc:
            print(f"edgeconvert: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("edgeconvert: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # the last line of defence: a message, never a bare traceback
            log.debug("unexpected failure", exc_info=True)
            print(
                f"edgeconvert: error: unexpected {type(exc).__name__}: {exc} "
                "(run with -v for the traceback, and please report it)",
                file=sys.stderr,
            )
            return 1
