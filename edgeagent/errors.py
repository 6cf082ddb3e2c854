"""The one error hierarchy of edgeagent.

Every failure the agent reports is an :class:`EdgeAgentError`. Third-party exceptions
(onnxruntime, LiteRT, paho-mqtt, httpx, tuf) are translated where they enter the code base,
with ``raise ... from exc`` so the cause stays in the log. The HTTP layer maps these classes to
status codes in exactly one place (``edgeagent.api.errors``); the CLI maps them to exit codes.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base class of every error edgeagent raises on purpose."""

    #: Exit status the CLI uses when this error ends a command (DESIGN 3.1).
    exit_code = 1


class ConfigError(EdgeAgentError):
    """A configuration file or value is invalid.

    Attributes:
        key_path: Dotted path of the offending key (``"http.listen"``, ``"models[1].name"``),
            or ``""`` when the whole document is at fault.
        source: The file (or environment variable) the value came from, when known.
    """

    exit_code = 2

    def __init__(self, message: str, key_path: str = "", source: str = "") -> None:
        self.message = message
        """What is wrong, without the source and key path (to re-raise with a source)."""
        self.key_path = key_path
        self.source = source
        where = ""
        if source:
            where += f"{source}: "
        if key_path:
            where += f"{key_path}: "
        super().__init__(f"{where}{message}")


class ProfileError(EdgeAgentError):
    """A device profile file is invalid, or a requested profile does not exist."""

    exit_code = 2

    def __init__(self, message: str, file: str = "", key_path: str = "") -> None:
        self.file = file
        self.key_path = key_path
        where = ""
        if file:
            where += f"{file}: "
        if key_path:
            where += f"{key_path}: "
        super().__init__(f"{where}{message}")


class BackendUnavailable(EdgeAgentError):
    """An optional runtime (LiteRT, onnxruntime-gpu, ...) is not installed on this box.

    Attributes:
        backend: The backend's name (``"onnxruntime"``, ``"litert"``).
        hint: What to install to get it.
    """

    def __init__(self, backend: str, reason: str, hint: str = "") -> None:
        self.backend = backend
        self.hint = hint
        text = f"backend {backend!r} unavailable: {reason}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class TransientError(EdgeAgentError):
    """A failure that says nothing about the thing tried (a hub out of reach, metadata that
    expired): the version owner tries again later and does not mark a release failed."""


class ModelError(EdgeAgentError):
    """A model file could not be loaded, warmed up or checked."""


class InferenceInputError(EdgeAgentError):
    """A request's inputs do not match the model's signature (name, datatype, shape, size)."""


class InferenceError(EdgeAgentError):
    """The runtime failed while running a valid request."""


class ModelNotFound(EdgeAgentError):
    """No model (or no such version of a model) is known to the agent."""


class ModelNotReady(EdgeAgentError):
    """The model is known but is not loaded and warmed up (yet)."""


class Overloaded(EdgeAgentError):
    """The model's queue is full; the caller should retry later.

    Attributes:
        retry_after_s: Suggested back-off in seconds.
    """

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class DeadlineExceeded(Overloaded):
    """A request's ``timeout`` passed while it waited in the model's queue; it was not run.

    An :class:`Overloaded` (HTTP 503 with Retry-After; gRPC UNAVAILABLE), as Triton answers it.
    """


class HubError(EdgeAgentError):
    """The hub could not be reached, or what it served could not be verified."""


class HubTransientError(HubError, TransientError):
    """A transfer from the hub failed on the way, with nothing known to be wrong with what it
    serves: unreachable, an HTTP 5xx or 429, a reset, a timeout, a transfer slower than
    ``hub.min_rate_bytes_s`` or past its deadline, one that ended short. Retried with backoff;
    never a reason to mark a release as failed."""


class VerificationError(HubError):
    """Hub content failed verification (signature, hash, length, version rules).

    Raised for a file only once it is complete (or longer than signed): a transfer that
    ended short is a :class:`HubTransientError`.
    """


class BrokerError(EdgeAgentError):
    """The MQTT broker is unreachable, refused us, or did not acknowledge a message."""
