"""Building blocks of the hub tests: models, releases and a sync wired to a real manager."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from edgeconvert.hub import Hub
from edgeconvert.publish import publish

from edgeagent.config import HubSection, ModelSection
from edgeagent.device.plan import PlannedProvider, ProviderPlan
from edgeagent.hub.bundle import Variant
from edgeagent.hub.source import HubSource, StepHook
from edgeagent.hub.store import ModelStore
from edgeagent.runtime.manager import ModelManager
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.versions.history import History, ModelHistory
from edgeagent.versions.owner import VersionOwner
from tests import onnx_models

SAMPLE = np.random.default_rng(7).standard_normal((2, 1, 4)).astype(np.float32)


def cpu_planner(fmt: str, precision: str, sha: str, overrides: object = None) -> ProviderPlan:
    return ProviderPlan(fmt, precision, (PlannedProvider("CPUExecutionProvider"),), threads=1)


def first_variant(variants: Any) -> tuple[Variant, str]:
    return variants[0], "the only one"


def release(hub: Hub, work: Path, version: int, *, checks: bool = True,
            wrong_checks: bool = False, hidden: int = 8) -> Path:
    """Publish model ``m`` version ``version`` (an MLP with its own weights); return its file."""
    folder = work / f"v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx_models.mlp(folder / "m.onnx", n_in=4, n_hidden=hidden, n_out=3, seed=version)
    samples = None
    if checks:
        samples = folder / "samples.npz"
        if wrong_checks:  # expected outputs no model version gives
            np.savez(samples, **{"inputs/input": SAMPLE,
                                 "outputs/logits": np.full((2, 1, 3), 99, np.float32)})
        else:
            np.savez(samples, input=SAMPLE)
    publish(hub.dir, hub.keys_dir, "m", version, [str(model)], checks=samples)
    return model


class Rig:
    """A version owner over a real hub source and a real manager, for one model ``m``
    configured ``latest`` (or ``version``): what the agent builds, without HTTP or MQTT."""

    def __init__(self, state_dir: Path, url: str, hub: Hub | Path, *,
                 on_step: StepHook | None = None, version: int | str = "latest",
                 **hub_keys: Any) -> None:
        keep = hub_keys.pop("keep_versions", 1)
        root = hub if isinstance(hub, Path) else hub.meta_dir / "1.root.json"
        section = HubSection(url=url, root=str(root), poll_interval_s=60,
                             keep_versions=keep, **hub_keys)
        self.manager = ModelManager(BackendRegistry(), cpu_planner)
        self.hub = HubSource(section, state_dir, first_variant, on_step=on_step)
        self.owner = VersionOwner(self.manager, state_dir, state_dir, device_id="rig",
                                  keep_versions=keep, hub=self.hub, poll_interval_s=60,
                                  on_step=on_step)
        self.sections = (ModelSection(name="m", version=version),)
        self.state_dir = state_dir
        self._started = False

    @property
    def store(self) -> ModelStore:
        return self.hub.store

    async def start(self) -> None:
        """Start-up: what the store has serves at once (the poll task is stopped again: the
        tests drive each pass themselves)."""
        if not self._started:
            self._started = True
            await self.owner.start(self.sections)
            assert self.owner._task is not None
            self.owner._task.cancel()

    async def sync_once(self) -> float:
        await self.start()
        return await self.owner.sync_once()

    def history(self, name: str = "m") -> ModelHistory:
        return History(self.state_dir).read().model(name)

    def served(self, name: str = "m") -> int:
        return self.manager.get(name).version

    async def close(self) -> None:
        await self.owner.stop()
        await self.manager.close(1)


def make_sync(state_dir: Path, url: str, hub: Hub, *, on_step: StepHook | None = None,
              **hub_keys: Any) -> Rig:
    return Rig(state_dir, url, hub, on_step=on_step, **hub_keys)
