"""A device for MQTT tests: the real FleetLink over a real ModelManager, with a catalog of model
versions made of real ONNX files (version 3 of ``mlp`` fails its checks on this box)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.config import parse_config
from edgeagent.control.deploy import CatalogDeployer
from edgeagent.control.link import FleetLink
from edgeagent.device.plan import PlannedProvider, ProviderPlan
from edgeagent.errors import ModelNotFound
from edgeagent.runtime.checks import ModelCheck
from edgeagent.runtime.manager import ModelManager, ModelSource
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.runtime.scheduler import InferenceScheduler
from edgeagent.telemetry.reporter import ModelFigures
from edgeagent.telemetry.system import SystemSampler
from tests import onnx_models


def cpu_planner(fmt: str, precision: str, sha: str) -> ProviderPlan:
    return ProviderPlan(fmt, precision, (PlannedProvider("CPUExecutionProvider"),), threads=1)


def make_catalog(models_dir: Path) -> dict[str, dict[int, ModelSource]]:
    """``mlp`` versions 1 and 2 (good) and 3 (its check expects outputs it does not give)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    wrong = ModelCheck({"input": np.zeros((1, 8), np.float32)},
                       {"logits": np.full((1, 4), 99.0, np.float32)})
    out: dict[int, ModelSource] = {}
    for version, seed in ((1, 1), (2, 2), (3, 3)):
        path = onnx_models.mlp(models_dir / f"mlp-v{version}.onnx", n_in=8, n_hidden=8, n_out=4,
                               seed=seed)
        out[version] = ModelSource(path, version, checks=(wrong,) if version == 3 else ())
    return {"mlp": out}


class Device:
    """One agent's MQTT side, started and stopped from a test's event loop."""

    def __init__(self, state_dir: Path, catalog: Mapping[str, Mapping[int, ModelSource]],
                 device_id: str = "dev1", **mqtt: Any) -> None:
        tags = mqtt.pop("tags", [])
        self.config = parse_config({"agent": {"device_id": device_id, "tags": tags},
                                    "mqtt": {"telemetry_interval_s": 0.2, **mqtt}})
        self.catalog = catalog
        self.manager = ModelManager(BackendRegistry(), cpu_planner)
        self.scheduler = InferenceScheduler(self.manager)
        self.reloads = 0

        async def versions(name: str) -> Mapping[int, ModelSource]:
            if name not in self.catalog:
                raise ModelNotFound(f"unknown model {name!r}")
            return self.catalog[name]

        async def reload() -> dict[str, Any]:
            self.reloads += 1
            return {"summary": "no change"}

        self.deployer = CatalogDeployer(self.manager, versions)
        self.link = FleetLink(
            self.config, device_id, state_dir, version="9.9.9",
            system=SystemSampler(Path("/"), disk_path=state_dir, nvml=False),
            models=ModelFigures(self.scheduler.all_stats, self.manager.status),
            reported=lambda: {"models": {m["name"]: {"version": m.get("version"),
                                                     "provider": m.get("provider"),
                                                     "last_error": m.get("last_error")}
                                         for m in self.manager.status()}},
            deployer=self.deployer, reload_config=reload, backoff=(0.1, 0.5))

    async def start(self, load: int | None = 1) -> None:
        if load is not None:
            for name, versions in self.catalog.items():
                await self.manager.load(name, versions[load])
        await self.link.start()

    async def stop(self) -> None:
        await self.link.stop()
        await self.manager.close(1.0)
