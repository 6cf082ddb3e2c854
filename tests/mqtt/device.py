"""A device for MQTT tests: the real FleetLink and version owner over a real ModelManager, with
a ``path`` model ``mlp`` whose local versions 1 and 2 are real ONNX files and version 3 a file
that does not load on this box."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeagent.config import ModelSection, parse_config
from edgeagent.control.link import FleetLink
from edgeagent.device.plan import PlannedProvider, ProviderPlan
from edgeagent.errors import EdgeAgentError
from edgeagent.runtime.manager import ModelManager
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.runtime.scheduler import InferenceScheduler
from edgeagent.telemetry.reporter import ModelFigures
from edgeagent.telemetry.system import SystemSampler
from edgeagent.versions.history import History
from edgeagent.versions.local import LocalFiles
from edgeagent.versions.owner import VersionOwner
from tests import onnx_models


def cpu_planner(fmt: str, precision: str, sha: str, overrides: object = None) -> ProviderPlan:
    return ProviderPlan(fmt, precision, (PlannedProvider("CPUExecutionProvider"),), threads=1)


def make_catalog(models_dir: Path) -> list[Path]:
    """The files of ``mlp`` versions 1 and 2 (good) and 3 (truncated: it does not load)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for version in (1, 2, 3):
        path = onnx_models.mlp(models_dir / f"mlp-v{version}.onnx", n_in=8, n_hidden=8, n_out=4,
                               seed=version)
        if version == 3:
            path.write_bytes(path.read_bytes()[:40])
        out.append(path)
    return out


def seed_local_versions(state_dir: Path, files: list[Path]) -> None:
    """Make ``files`` local versions 1, 2, 3 of ``mlp`` (what replacing the configured file
    and reloading does, one file at a time), kept as earlier versions would be."""
    local = LocalFiles(state_dir, state_dir)
    history = History(state_dir)
    for path in files:
        known = history.read().model("mlp").local
        version, sha = local.current(ModelSection(name="mlp", path=str(path)), dict(known))
        history.modify(lambda s, v=version, h=sha: s.model("mlp").local.__setitem__(v, h))
    history.modify(lambda s: setattr(s.model("mlp"), "previous", [3, 2]))


class Device:
    """One agent's MQTT side, started and stopped from a test's event loop."""

    def __init__(self, state_dir: Path, catalog: list[Path], device_id: str = "dev1",
                 **mqtt: Any) -> None:
        tags = mqtt.pop("tags", [])
        settle_s = mqtt.pop("settle_s", 15.0)
        self.config = parse_config({"agent": {"device_id": device_id, "tags": tags},
                                    "mqtt": {"telemetry_interval_s": 0.2, **mqtt}})
        self.catalog = catalog
        self.state_dir = state_dir
        if catalog and not History(state_dir).path.exists():
            seed_local_versions(state_dir, catalog)
        self.manager = ModelManager(BackendRegistry(), cpu_planner)
        self.scheduler = InferenceScheduler(self.manager)
        self.owner = VersionOwner(self.manager, state_dir, state_dir, device_id=device_id,
                                  groups=tags, keep_versions=3)
        self.reloads = 0

        async def reload() -> dict[str, Any]:
            self.reloads += 1
            return {"summary": "no change"}

        self.link = FleetLink(
            self.config, device_id, state_dir, version="9.9.9",
            system=SystemSampler(Path("/"), disk_path=state_dir, nvml=False),
            models=ModelFigures(self.scheduler.all_stats, self.manager.status),
            reported=self._reported, owner=self.owner, reload_config=reload,
            backoff=(0.1, 0.5), settle_s=settle_s)

    def _reported(self) -> dict[str, Any]:
        return {"models": {m["name"]: {"version": m.get("version"),
                                       "provider": m.get("provider"),
                                       "last_error": m.get("last_error"),
                                       **self.owner.describe(m["name"])}
                           for m in self.manager.status()},
                "rollouts": self.owner.rollouts(), "desired": self.owner.desired()}

    def active_version(self, name: str = "mlp") -> int | None:
        try:
            return self.manager.get(name).version
        except EdgeAgentError:
            return None

    async def start(self, load: int | None = 1) -> None:
        sections = []
        if load is not None and self.catalog:
            sections = [ModelSection(name="mlp", path=str(self.catalog[load - 1]))]
        await self.owner.start(sections)
        await self.link.start()

    async def stop(self) -> None:
        await self.link.stop()
        await self.owner.stop()
        await self.manager.close(1.0)
