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

from edgeagent.errors import EdgeAgentError
from tests.hub.helpers import Rig


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
        rig = Rig(args.state_dir, args.url, Path(args.root), on_step=step, keep_versions=1)
        await rig.start()  # start-up: what the store has serves at once
        try:
            print(f"started {rig.served()}", flush=True)
        except EdgeAgentError:
            print("started empty", flush=True)
        await rig.sync_once()
        print(f"serving {rig.served()}", flush=True)
        await rig.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
