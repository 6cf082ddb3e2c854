"""What the local API is given by the composition root: no component builds its siblings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.config import AgentConfig
from edgeagent.runtime.manager import ModelManager
from edgeagent.runtime.memory import HeapTrimmer
from edgeagent.runtime.scheduler import InferenceScheduler
from edgeagent.runtime.shm import SharedMemoryRegistry

if TYPE_CHECKING:
    from edgeagent.versions.owner import VersionOwner


@dataclass
class Services:
    """The transport-free services the HTTP handlers call."""

    config: AgentConfig
    manager: ModelManager
    scheduler: InferenceScheduler
    owner: VersionOwner
    token: str | None
    status: Callable[[], dict[str, Any]]
    draining: Callable[[], bool] = field(default=lambda: False)
    shm: SharedMemoryRegistry = field(default_factory=SharedMemoryRegistry)
    """System shared memory regions registered by clients (both transports)."""
    trimmer: HeapTrimmer = field(default_factory=HeapTrimmer)
    """Gives the heap back after a burst of large requests (both transports)."""
    root: Path = Path("/")
    """Where procfs and sysfs are (system figures on /metrics)."""
