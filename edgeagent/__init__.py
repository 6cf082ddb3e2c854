"""edgeagent: an edge inference runtime and device agent.

The public API is what this module exports; everything else is private to the package.
"""

from __future__ import annotations

__version__ = "0.1.0"

from edgeagent.config import AgentConfig, load_config
from edgeagent.errors import (
    BackendUnavailable,
    ConfigError,
    EdgeAgentError,
    HubError,
    HubTransientError,
    InferenceError,
    InferenceInputError,
    ModelError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ProfileError,
    VerificationError,
)

__all__ = [
    "AgentConfig",
    "BackendUnavailable",
    "ConfigError",
    "EdgeAgentError",
    "HubError",
    "HubTransientError",
    "InferenceError",
    "InferenceInputError",
    "ModelError",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "ProfileError",
    "VerificationError",
    "__version__",
    "load_config",
]
