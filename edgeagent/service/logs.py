"""Logging set-up: journald-friendly under systemd, readable on a terminal, or JSON lines.

Under systemd with stderr connected to the journal (``JOURNAL_STREAM`` names stderr's device and
inode), lines carry no timestamp (journald adds its own) and start with the ``<N>`` syslog
priority prefix that journald reads on stream input, so ``journalctl -p warning`` works. On a
terminal (or a file), lines start with a timestamp. ``json`` writes one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

#: Python level -> syslog priority (sd-daemon(3)): 7 debug, 6 info, 4 warning, 3 err, 2 crit.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}

FORMATS = ("auto", "text", "json", "journal")

_HANDLER_NAME = "edgeagent"


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a Python log level (levels between the named ones round down)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``, with the prefix on every line so tracebacks keep their priority."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc when there is a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def stream_is_journal(env: Mapping[str, str], stream: IO[str]) -> bool:
    """Whether ``stream`` is systemd's journal stream (``JOURNAL_STREAM=<dev>:<inode>``).

    INVOCATION_ID alone is not enough: it says systemd started us, not where stderr goes
    (``StandardError=file:...`` or a tty), and only the journal understands the prefixes.
    """
    dev, sep, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # a stream without a descriptor (pytest's capture)
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def resolve_format(fmt: str, env: Mapping[str, str], stream: IO[str]) -> str:
    """``auto`` becomes ``journal`` or ``text``; other formats stay as they are."""
    if fmt == "auto":
        return "journal" if stream_is_journal(env, stream) else "text"
    return fmt


def make_formatter(fmt: str) -> logging.Formatter:
    """The formatter of a resolved format (``text``, ``json`` or ``journal``)."""
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise ValueError(f"unknown log format {fmt!r} (expected one of {', '.join(FORMATS)})")


def setup_logging(level: str, fmt: str, env: Mapping[str, str],
                  stream: IO[str] | None = None) -> str:
    """Configure the root logger; called again on reload, it replaces its own handler only.

    Args:
        level: ``debug``, ``info``, ``warning``, ``error`` or ``critical``.
        fmt: ``auto``, ``text``, ``json`` or ``journal``.
        env: The process environment (``JOURNAL_STREAM`` is read).
        stream: Where to write; default stderr.

    Returns:
        The format in use (``auto`` resolved).
    """
    stream = stream or sys.stderr
    resolved = resolve_format(fmt, env, stream)
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(make_formatter(resolved))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    return resolved
