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
from edgeagent.hub.sync import HubSync, StepHook
from edgeagent.runtime.manager import ModelManager
from edgeagent.runtime.registry import BackendRegistry
from tests import onnx_models

SAMPLE = np.random.default_rng(7).standard_normal((2, 1, 4)).astype(np.float32)


def cpu_planner(fmt: str, precision: str, sha: str) -> ProviderPlan:
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


def make_sync(state_dir: Path, url: str, hub: Hub, *, on_step: StepHook | None = None,
              **hub_keys: Any) -> HubSync:
    section = HubSection(url=url, root=str(hub.meta_dir / "1.root.json"), poll_interval_s=60,
                         keep_versions=hub_keys.pop("keep_versions", 1), **hub_keys)
    manager = ModelManager(BackendRegistry(), cpu_planner)
    return HubSync(section, (ModelSection(name="m", version="latest"),), state_dir, manager,
                   first_variant, on_step=on_step)
