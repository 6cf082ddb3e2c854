"""Log formats: journald priority prefixes, text with timestamps, JSON lines."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.service.logs import (
    JournalFormatter,
    JsonFormatter,
    make_formatter,
    resolve_format,
    setup_logging,
    stream_is_journal,
    syslog_priority,
)


def _record(level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("edgeagent.x", level, __file__, 1, msg, args, None)


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


@pytest.mark.parametrize(("level", "prio"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
    (logging.CRITICAL, 2), (25, 6), (5, 7),
])
def test_syslog_priority(level: int, prio: int) -> None:
    assert syslog_priority(level) == prio


def test_journal_lines_have_a_priority_and_no_timestamp() -> None:
    text = JournalFormatter().format(_record(logging.WARNING, "model %s failed\nsecond line", "m"))
    assert text.splitlines() == ["<4>edgeagent.x: model m failed", "<4>second line"]


def test_json_lines() -> None:
    entry = json.loads(JsonFormatter().format(_record(logging.ERROR, "n=%d", 3)))
    assert entry["level"] == "error"
    assert entry["logger"] == "edgeagent.x"
    assert entry["msg"] == "n=3"
    assert isinstance(entry["ts"], float)


def test_text_has_a_timestamp() -> None:
    text = make_formatter("text").format(_record(logging.INFO, "hello"))
    assert text.endswith("INFO edgeagent.x: hello")
    assert text[:4].isdigit()


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        make_formatter("xml")


def test_journal_stream_detection(tmp_path: Path) -> None:
    with (tmp_path / "err").open("w") as stream, (tmp_path / "other").open("w") as other:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stream_is_journal(env, stream)
        assert resolve_format("auto", env, stream) == "journal"
        assert resolve_format("json", env, stream) == "json"
        assert not stream_is_journal(env, other)  # stderr redirected elsewhere
        assert resolve_format("auto", env, other) == "text"
        assert not stream_is_journal({"JOURNAL_STREAM": "garbage"}, stream)
        assert not stream_is_journal({"INVOCATION_ID": "abc"}, stream)


def test_setup_replaces_its_own_handler(tmp_path: Path, root_logger: logging.Logger) -> None:
    with (tmp_path / "log").open("w") as stream:
        before = len(root_logger.handlers)
        assert setup_logging("info", "json", {}, stream) == "json"
        assert setup_logging("debug", "text", {}, stream) == "text"  # a reload
        assert len(root_logger.handlers) == before + 1
        assert root_logger.level == logging.DEBUG
        logging.getLogger("edgeagent.t").debug("x=%s", 1)
    assert (tmp_path / "log").read_text().strip().endswith("DEBUG edgeagent.t: x=1")
