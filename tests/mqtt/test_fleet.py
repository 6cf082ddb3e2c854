"""``edgeagent fleet`` (run as a real process) against agents on a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from edgeagent.control.fleet import FleetError, parse_percent, parse_waves, wave_sizes
from edgeagent.runtime.manager import ModelSource
from tests.mqtt.conftest import Broker
from tests.mqtt.device import Device, make_catalog
from tests.mqtt.test_link import until


async def fleet(broker: Broker, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeagent", "fleet", *args, "--broker", broker.url,
        "--timeout", "60", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def test_staged_deploy_status_and_revert(tmp_path: Path, broker: Broker) -> None:
    catalog = make_catalog(tmp_path / "models")
    good3 = dict(catalog["mlp"])
    good3[3] = ModelSource(catalog["mlp"][1].path, 3)  # version 3 passes on dev0 only
    devices = [Device(tmp_path / f"s{i}", {"mlp": good3} if i == 0 else catalog,
                      device_id=f"dev{i}", url=broker.url, tags=["lab"]) for i in range(4)]

    async def go() -> None:
        for d in devices:
            await d.start()
        for d in devices:
            await until(lambda d=d: d.link.client.connected, "connected")  # type: ignore[union-attr]
        await asyncio.sleep(0.5)  # first reported states; fleet reads what is retained
        code, out = await fleet(broker, "deploy", "mlp@2", "--group", "lab",
                                "--waves", "50%,100%")
        assert code == 0, out
        assert "wave 1/2" in out and "wave 2/2" in out
        assert all(d.deployer.active_version("mlp") == 2 for d in devices)
        await asyncio.sleep(0.5)
        code, out = await fleet(broker, "status", "--json")
        assert code == 0, out
        rows = {r["device"]: r for r in json.loads(out)}
        assert set(rows) == {"dev0", "dev1", "dev2", "dev3"}
        assert all(r["models"]["mlp"]["version"] == 2 and r["online"] for r in rows.values())
        code, out = await fleet(broker, "status")
        assert "dev3" in out and "mlp v2 CPUExecutionProvider" in out
        # v3 fails its checks on dev1: the first wave (dev0, dev1) stops and is reverted.
        code, out = await fleet(broker, "deploy", "mlp@3", "--all", "--waves", "50%,100%",
                                "--max-failures", "0%")
        assert code == 1, out
        assert "stopping and reverting" in out and "wave 2/2" not in out
        assert [d.deployer.active_version("mlp") for d in devices] == [2, 2, 2, 2]
        assert "check 0" in out
        # Rollback by command: back to version 1 everywhere the history has it.
        code, out = await fleet(broker, "rollback", "mlp", "--device", "dev2", "dev3")
        assert code == 0, out
        assert devices[2].deployer.active_version("mlp") == 1
        code, out = await fleet(broker, "deploy", "mlp@2", "--device", "ghost")
        assert code == 1 and "unknown device(s): ghost" in out
        for d in devices:
            await d.stop()

    asyncio.run(go())


def test_wave_arithmetic_and_bad_arguments() -> None:
    assert parse_waves("5%,25%,100%") == [0.05, 0.25, 1.0]
    assert wave_sizes(4, [0.05, 0.25, 1.0]) == [1, 1, 2]
    assert wave_sizes(100, [0.05, 0.25, 1.0]) == [5, 20, 75]
    assert parse_percent("10%") == 0.1
    for bad in ("50%,25%", "5%,50%", "abc", "0%,100%"):
        with pytest.raises(FleetError):
            parse_waves(bad)
    with pytest.raises(FleetError):
        parse_percent("150%")


def test_fleet_without_a_broker_says_so(tmp_path: Path, monkeypatch: Any) -> None:
    from edgeagent.cli import main

    monkeypatch.setenv("EDGEAGENT_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    assert main(["fleet", "status"]) == 1
