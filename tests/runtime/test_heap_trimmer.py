"""The heap is handed back once a burst of large requests has passed, never during one."""

from __future__ import annotations

import asyncio

from edgeagent.runtime.memory import HeapTrimmer


def test_trims_once_after_the_burst_and_never_while_one_runs() -> None:
    async def go() -> None:
        trimmer = HeapTrimmer(quiet_s=0.05)
        for _ in range(5):  # a burst: each end re-arms the one timer
            trimmer.start()
            trimmer.note()
        trimmer.start()  # one still running when the first timer is due
        await asyncio.sleep(0.15)
        assert trimmer.trims == 0
        trimmer.note()
        while trimmer.trims == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert trimmer.trims == 1
        trimmer.close()

    asyncio.run(go())


def test_close_cancels_a_pending_trim() -> None:
    async def go() -> None:
        trimmer = HeapTrimmer(quiet_s=0.01)
        trimmer.start()
        trimmer.note()
        trimmer.close()
        await asyncio.sleep(0.05)
        assert trimmer.trims == 0

    asyncio.run(go())
