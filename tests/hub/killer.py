"""Test harness: run one hub sync in this process and SIGKILL it at a named step.

``python -m tests.hub.killer STATE_DIR HUB_URL ROOT [--kill-at STEP]``: prints the version
served at the end (when not killed). The kill point is this script's argument, never
something production code reads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from edgeagent.config import HubSection, ModelSection
from edgeagent.errors import EdgeAgentError
from edgeagent.hub.sync import HubSync
from edgeagent.runtime.manager import ModelManager
from edgeagent.runtime.registry import BackendRegistry
from tests.hub.helpers import cpu_planner, first_variant


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("url")
    parser.add_argument("root")
    parser.add_argument("--kill-at", default="")
    args = parser.parse_args()

    def step(name: str) -> None:
        if name == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    async def run() -> None:
        manager = ModelManager(BackendRegistry(), cpu_planner)
        section = HubSection(url=args.url, root=args.root, keep_versions=1)
        sync = HubSync(section, (ModelSection(name="m", version="latest"),), args.state_dir,
                       manager, first_variant, on_step=step)
        await sync.store_ready()
        try:  # start-up: what the store has serves at once
            await manager.load("m", await sync.resolve(sync.sections["m"]))
            print(f"started {manager.get('m').version}", flush=True)
        except EdgeAgentError:
            print("started empty", flush=True)
        await sync.sync_once()
        print(f"serving {manager.get('m').version}", flush=True)
        await sync.stop()
        await manager.close(1)

    asyncio.run(run())


if __name__ == "__main__":
    main()
