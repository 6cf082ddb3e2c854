"""The demo served on embedded defaults: a local hub with one model, made here (no download).

The model is a tiny deterministic classifier: ``input`` FP32 [-1, 4] -> ``probabilities`` FP32
[-1, 3] (a dense layer and a softmax), so that the README's first ``curl`` has something to
answer. With no configuration file, the agent makes (once) a ``file://`` hub under
``state_dir/demo-hub`` signed with keys in ``state_dir/demo-keys``, publishes the model there
as ``demo`` version 1 with checks, and serves ``demo`` version ``latest`` from it through the
normal hub path (sync, verification, store, checks, activation).
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.config import AgentConfig, ModelSection

DEMO_NAME = "demo"
DEMO_HUB = "demo-hub"
DEMO_KEYS = "demo-keys"
DEMO_FILE = "demo.onnx"
#: The demo hub is signed once, on the box that serves it: no short-lived metadata to renew.
DEMO_EXPIRY = {role: timedelta(days=3650) for role in ("root", "targets", "snapshot", "timestamp")}
WEIGHTS = np.array(
    [[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [-0.7, 0.1, 0.9], [0.5, 0.5, 0.5]], dtype=np.float32
)
BIAS = np.array([0.1, 0.0, -0.1], dtype=np.float32)


def demo_model() -> bytes:
    """The demo model (ONNX, opset 13: MatMul by :data:`WEIGHTS`, Add :data:`BIAS`, Softmax),
    shipped as ``edgeagent/demo.onnx`` so that the box needs no ``onnx`` package to make it
    (a test checks the file against these weights)."""
    return (resources.files("edgeagent") / DEMO_FILE).read_bytes()


def demo_outputs(inputs: np.ndarray) -> np.ndarray:
    """What the demo model answers (computed here, for its checks)."""
    logits = inputs @ WEIGHTS + BIAS
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    out: np.ndarray = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


def demo_config(config: AgentConfig, state_dir: Path) -> AgentConfig:
    """Embedded defaults (no file, no hub, no models) plus the demo hub and model; any other
    configuration unchanged. Pure: :func:`ensure_demo_hub` makes the hub."""
    if config.source != "embedded defaults" or config.models or config.hub.url:
        return config
    hub = dataclasses.replace(
        config.hub, url=(state_dir / DEMO_HUB).absolute().as_uri(),
        root=str((state_dir / DEMO_HUB / "metadata" / "1.root.json").absolute()))
    return dataclasses.replace(config, hub=hub,
                               models=(ModelSection(name=DEMO_NAME, version="latest"),))


def is_demo(config: AgentConfig, state_dir: Path) -> bool:
    """The configuration serves the demo hub (:func:`demo_config` made it)."""
    return config.hub.url == (state_dir / DEMO_HUB).absolute().as_uri()


def ensure_demo_hub(state_dir: Path) -> bool:
    """Make the demo hub and publish the demo model, unless done already (blocking).

    Built under a temporary folder and renamed into place, the hub last, so an interrupted
    run is started over and a finished one is never touched again.

    Returns:
        True if the hub was made now.
    """
    hub_dir, keys_dir = state_dir / DEMO_HUB, state_dir / DEMO_KEYS
    if (hub_dir / "metadata" / "timestamp.json").is_file():
        return False
    # Signing is needed once per box: its imports stay off the start-up path of later runs.
    from edgeagent.hub.repository import (
        HubRepository,
        file_ref,
        release_bundle,
    )

    work = state_dir / ".demo-hub.tmp"
    # Leftovers of an interrupted run, and the metadata the store trusted from an earlier demo
    # hub (signed with other keys: it would refuse the new one).
    for leftover in (work, keys_dir, hub_dir, state_dir / "hub" / "metadata"):
        shutil.rmtree(leftover, ignore_errors=True)
    repo = HubRepository(work / "hub", work / "keys", DEMO_EXPIRY)
    repo.init()
    model = demo_model()
    samples = np.random.default_rng(0).standard_normal((2, 1, 4)).astype(np.float32)
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {"inputs/input": samples,
                              "outputs/probabilities": demo_outputs(samples)}
    np.savez(buffer, **arrays)
    checks = buffer.getvalue()
    model_file = f"{DEMO_NAME}.onnx"
    bundle = release_bundle(
        DEMO_NAME, 1,
        inputs=[{"name": "input", "dtype": "float32", "shape": [-1, 4]}],
        outputs=[{"name": "probabilities"}],
        variants=[{**file_ref(model_file, model), "format": "onnx", "precision": "fp32",
                   "needs": {}}],
        checks={**file_ref("checks.npz", checks), "atol": 1e-4, "rtol": 1e-4})
    repo.add_release(DEMO_NAME, 1, {model_file: model, "checks.npz": checks}, bundle)
    os.replace(work / "keys", keys_dir)
    os.replace(work / "hub", hub_dir)
    shutil.rmtree(work, ignore_errors=True)
    return True
