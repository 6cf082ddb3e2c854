"""The controller's pure parts: wave arithmetic, member categories, summaries, config values,
and the store's ingest on SQLite (the same SQL runs on PostgreSQL in test_postgres)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgeagent.errors import ConfigError
from edgeagent.fleet.config import parse_fleet_config, parse_percent, parse_waves
from edgeagent.fleet.ingest import Ingest
from edgeagent.fleet.rollouts import classify, tally, verdict, wave_threshold
from edgeagent.fleet.store import Batch, SqliteStore


def test_waves_and_percentages() -> None:
    assert parse_waves("1%,10%,50%,100%") == (1.0, 10.0, 50.0, 100.0)
    assert parse_waves("100") == (100.0,)
    for bad in ("50%,25%,100%", "5%,50%", "abc", "0%,100%", ""):
        with pytest.raises(ConfigError, match=r"rollouts\.waves"):
            parse_waves(bad)
    assert parse_percent("5%") == 5.0
    with pytest.raises(ConfigError, match="from 0% to 100%"):
        parse_percent("150%")


def test_wave_threshold_raises_the_share_to_the_minimum_count() -> None:
    reachable = [3, 40, 90, 250, 7000]
    assert wave_threshold(1.0, 0, reachable, 0) == 100
    assert wave_threshold(1.0, 3, reachable, 0) == 100  # 1 % already covers 3 of them
    assert wave_threshold(1.0, 4, reachable, 0) == 251  # raised to the 4th bucket + 1
    assert wave_threshold(1.0, 99, reachable, 0) == 7001  # no more than there are
    assert wave_threshold(10.0, 0, reachable, 2000) == 2000  # never below the last wave
    assert wave_threshold(100.0, 0, [], 0) == 10_000


def test_categories() -> None:
    assert classify("applied", True, False, False, False) == "applied"
    assert classify("", False, True, False, False) == "untouched"
    assert classify("", True, False, False, False) == "not_reached"
    assert classify("base", True, True, False, False) == "pending"
    assert classify("base", True, True, True, False) == "no_answer"
    assert classify("pending", True, True, False, True) == "pending"  # on its way back
    assert classify("base", True, True, False, True) == "untouched"  # never switched


def test_tally_per_wave_and_verdicts() -> None:
    # (wave index, outcome, reachable, late, runs the version, count)
    rows = [(0, "applied", True, False, True, 3), (0, "failed", True, False, False, 1),
            (1, "", False, False, False, 2), (1, "base", True, False, False, 4),
            (2, "base", True, False, False, 10)]
    t = tally(rows, 200, [100, 200], aborted=False)
    assert t.total["applied"] == 3 and t.total["failed"] == 1
    assert t.total["not_reached"] == 2 and t.total["pending"] == 4
    assert t.total["untouched"] == 10 and t.members == 20 and t.running_version == 3
    assert t.per_wave[0] == {**t.per_wave[0], "applied": 3, "failed": 1}
    assert t.per_wave[1]["not_reached"] == 2 and t.per_wave[1]["pending"] == 4
    assert t.eligible == 8 and t.failures == 1
    r = {"phase": "done", "version": 2, "reason": "", "wave": 1, "waves": "[50, 100]"}
    done = tally([(0, "applied", True, False, True, 3), (0, "", False, False, False, 1)],
                 10_000, [10_000], aborted=False)
    text, ok = verdict(r, done)
    assert text == "done, incomplete: 3 of 4 devices run v2 (1 not reached)" and not ok
    clean = tally([(0, "applied", True, False, True, 3), (0, "held", True, False, False, 1)],
                  10_000, [10_000], aborted=False)
    assert verdict(r, clean) == ("done: 3 of 4 devices run v2 (1 held by a more specific "
                                 "document)", True)


def test_config_defaults_and_refusals() -> None:
    cfg = parse_fleet_config({})
    assert cfg.api.listen == "127.0.0.1:8090"
    assert cfg.database_url.endswith("fleet-data/fleet.db")
    for data, key in [({"api": {"listen": "unix:/x"}}, "api.listen"),
                      ({"database": {"url": "mysql://x"}}, "database.url"),
                      ({"inventory": {"stale_after_s": 1.0}}, "inventory.stale_after_s"),
                      ({"broker": {"topic_prefix": "a/#"}}, "broker.topic_prefix"),
                      ({"rollouts": {"min_devices": -1}}, "rollouts.min_devices"),
                      ({"broker": {"keepalive_s": "x"}}, "broker.keepalive_s")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_fleet_config(data, "fleet.toml")


def test_ingest_folds_a_burst_into_one_write(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "f.db")
    store.init_schema()

    class Inbox:
        prefix = "edgeagent"

        def __init__(self) -> None:
            self.inbox: list[tuple[str, bytes, bool]] = []

    ingest = Ingest(Inbox(), store, 65536)  # type: ignore[arg-type]
    batch = Batch()
    now = time.time()
    for i, state in enumerate(("online", "offline", "online")):
        assert ingest.take(batch, "edgeagent/d1/status",
                           f'{{"state": "{state}", "ts": {100 - i}}}'.encode(), now) == ""
    rep = (b'{"ts": 5, "tags": ["lab", "lab", "east"], "models": {"m": {"version": 3, '
           b'"source": "device pin, revision 2", "source_kind": "device", '
           b'"last_error": "boom"}}, "rollouts": {"r-1": {"outcome": "applied", "version": 3}}}')
    assert ingest.take(batch, "edgeagent/d1/reported", rep, now) == ""
    assert ingest.take(batch, "edgeagent/groups/reported", b"{}", now) == "bad device id"
    assert ingest.take(batch, "other/d1/status", b"{}", now) == "foreign topic"
    assert ingest.take(batch, "edgeagent/d1/cmd/x y/result", b"{}", now) == "bad request id"
    assert ingest.take(batch, "edgeagent/d1/whatever", b"{}", now) == "unknown topic"
    store.apply(batch)
    # Arrival order wins for status (the last one said online, with the oldest ts).
    [row] = store.devices(now=now, offline_after_s=60)
    assert row["state"] == "online" and row["tags"] == ["lab", "east"]
    assert row["models"]["m"] == {"version": 3, "state": "", "source": "device pin, revision 2",
                                  "source_kind": "device", "last_error": "boom"}
    assert row["last_error"] == "m: boom"
    assert store.groups() == {"east": 1, "lab": 1}
    # An older reported does not overwrite a newer one.
    older = Batch()
    ingest.take(older, "edgeagent/d1/reported", b'{"ts": 1, "tags": ["west"]}', now)
    store.apply(older)
    assert store.devices(now=now, offline_after_s=60)[0]["tags"] == ["lab", "east"]
    store.close()


def test_the_agent_never_imports_the_fleet_controller() -> None:
    import re

    repo = Path(__file__).resolve().parents[2] / "edgeagent"
    pattern = re.compile(r"^\s*(from|import)\s+edgeagent\.fleet\b", re.MULTILINE)
    offenders = [str(p.relative_to(repo)) for p in repo.rglob("*.py")
                 if "fleet" not in p.relative_to(repo).parts and p.name != "cli.py"
                 and pattern.search(p.read_text())]
    assert offenders == []


def test_every_fleet_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeagent.cli import main

    for argv in (["fleet"], ["fleet", "serve"], ["fleet", "status"], ["fleet", "devices"],
                 ["fleet", "rollout"], ["fleet", "rollout", "start"],
                 ["fleet", "rollout", "pause"], ["fleet", "rollout", "show"],
                 ["fleet", "rollback"], ["fleet", "pin"], ["fleet", "unpin"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0, argv
        assert "usage: edgeagent fleet" in capsys.readouterr().out
