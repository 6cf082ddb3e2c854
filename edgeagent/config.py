"""Configuration: one TOML file, environment overrides, embedded defaults.

``load_config`` is the only function here that touches the file system (it reads the file);
``parse_config`` validates a mapping with no I/O and no global reads: the environment is passed
in. Unknown keys are errors naming their key path (``models[1].max_batch_size``).

Environment overrides follow ``EDGEAGENT_<SECTION>__<KEY>`` (``EDGEAGENT_HTTP__LISTEN=
127.0.0.1:9000``); values are read as TOML literals when they parse as one (``8``, ``true``,
``["a", "b"]``), as plain strings otherwise. ``EDGEAGENT_CONFIG`` names the file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from edgeagent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/edgeagent/agent.toml")
ENV_PREFIX = "EDGEAGENT_"


@dataclass(frozen=True)
class AgentSection:
    """``[agent]``: who this box is and where it keeps its state."""

    device_id: str = ""
    """Device id on MQTT; empty = from /etc/machine-id (resolved at start-up, not here)."""
    state_dir: str = ""
    """Empty = ``$STATE_DIRECTORY`` under systemd, else ``./edgeagent-data``."""
    profile: str = "auto"
    profiles_dir: str = ""
    """Extra directory of operator-written device profiles, searched besides the shipped ones."""
    tags: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: str = "auto"
    """``auto`` (journald-friendly under systemd, text on a terminal), ``text`` or ``json``."""
    shutdown_grace_s: float = 10.0


@dataclass(frozen=True)
class HttpSection:
    """``[http]``: the local Open Inference Protocol endpoint."""

    listen: str = "127.0.0.1:8080"
    """``HOST:PORT`` or ``unix:PATH``."""
    token_file: str = ""
    max_request_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_tensor_elements: int = 64 * 1024 * 1024
    max_bytes_elements: int = 1024 * 1024
    """Elements one BYTES tensor may declare (each is a Python object on the box)."""
    header_timeout_s: float = 10.0
    """Seconds a request head may take to arrive in full (from its first byte, or from the
    connection's opening); past it the connection is closed."""
    body_timeout_s: float = 60.0
    """Seconds a request body may take to arrive in full, once its head is in."""
    keepalive_timeout_s: float = 5.0
    """Seconds an idle keep-alive connection is kept open for a next request."""
    max_connections: int = 4096
    """Open connections at most; lowered at start-up to stay below the open-file limit."""


@dataclass(frozen=True)
class GrpcSection:
    """``[grpc]``: the Open Inference Protocol over gRPC (Triton's ``GRPCInferenceService``).

    The request bounds of ``[http]`` (``max_request_bytes``, ``max_tensor_elements``) and its
    token apply to gRPC too.
    """

    listen: str = "127.0.0.1:8001"
    """``HOST:PORT``, ``unix:PATH``, or empty: no gRPC listener."""


@dataclass(frozen=True)
class MetricsSection:
    """``[metrics]``: an optional listener of its own for ``GET /metrics``, so a remote
    Prometheus can scrape without reaching inference (``/metrics`` stays on ``[http]`` too)."""

    listen: str = ""
    """``HOST:PORT`` or ``unix:PATH``; empty = no separate listener."""
    token_file: str = ""
    """Bearer token for the metrics listener; empty = the HTTP token (``http.token_file``),
    if any. Beyond loopback one of the two is required."""


@dataclass(frozen=True)
class HubSection:
    """``[hub]``: where models come from and how they are trusted."""

    url: str = ""
    root: str = ""
    """Path of the hub's trusted root metadata (``root.json``) provisioned on the box."""
    poll_interval_s: float = 300.0
    keep_versions: int = 2
    """Previous versions kept on disk per model for instant rollback."""
    disk_budget_mb: int = 0
    """0 = no budget beyond the free space check."""
    timeout_s: float = 30.0
    """Connect and read timeout; also the window ``min_rate_bytes_s`` is measured over."""
    file_timeout_s: float = 300.0
    """Each file (metadata or model) may take this plus its size at ``min_rate_bytes_s``."""
    min_rate_bytes_s: int = 16 * 1024
    """Slowest transfer kept going (16 KiB/s: a weak mobile link); slower ones are retried."""
    retries: int = 5
    """Further attempts after a transient failure, with backoff and jitter."""


@dataclass(frozen=True)
class MqttSection:
    """``[mqtt]``: telemetry out, desired state and commands in."""

    url: str = ""
    protocol: str = "5"
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    topic_prefix: str = "edgeagent"
    keepalive_s: int = 60
    telemetry_interval_s: float = 30.0
    reported_interval_s: float = 300.0
    """The reported state is re-published at least this often (fleet controllers catch up)."""
    spool_max_messages: int = 100_000
    spool_max_bytes: int = 64 * 1024 * 1024


TUNE_OBJECTIVES = ("throughput", "latency")


@dataclass(frozen=True)
class TuneSection:
    """``tune`` of a ``[[models]]`` entry: ``true``/``false``, or this table (on-box tuning)."""

    enabled: bool = True
    """A table turns tuning on unless it says ``enabled = false``."""
    objective: str = "throughput"
    """``throughput`` (items per second at the configured batch) or ``latency`` (p50 at
    batch 1)."""
    budget_s: float = 60.0
    """The search stops after this long (per model, per tuning run)."""
    max_memory_mb: float = 0.0
    """Candidates that add more memory than this lose; 0 = no budget."""
    max_p99_ms: float = 0.0
    """Candidates whose p99 latency at batch 1 is above this lose; 0 = no bound."""
    min_gain: float = 0.05
    """A candidate replaces the profile's default only when it beats it by more than this
    fraction and by more than the measured run-to-run noise."""
    threads: tuple[int, ...] = ()
    """Thread counts to try; empty = 1, half the cores and all of them."""
    batch_sizes: tuple[int, ...] = ()
    """Batch sizes to measure throughput at (batching on); empty = ``max_batch_size``."""


def _tune_off() -> TuneSection:
    return TuneSection(enabled=False)


@dataclass(frozen=True)
class ModelSection:
    """One ``[[models]]`` entry: a model from the hub (``version``) or a local file (``path``)."""

    name: str
    version: int | str | None = None
    """An integer or ``"latest"``: the model comes from the hub."""
    path: str = ""
    """A local ``.onnx`` / ``.tflite`` file: for boxes without a hub."""
    max_batch_size: int = 0
    """0 = no dynamic batching."""
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 64
    """Requests waiting per model beyond which the endpoint answers 503."""
    max_concurrency: int = 2
    """Inferences of this model running at once."""
    providers: tuple[str, ...] = ()
    """Execution providers (ONNX) or delegates (TFLite) to use, in order, instead of the
    profile's; empty = the profile's."""
    precision: str = ""
    """Only variants of this precision (``fp32``, ``fp16``, ``int8``); empty = the profile's
    ranking decides."""
    variant: str = ""
    """The bundle variant to use (its file name; hub models); empty = the profile's ranking."""
    threads: int | None = None
    """Intra-op / interpreter threads instead of the profile's (0 = the runtime's default)."""
    tune: TuneSection = field(default_factory=_tune_off)
    """On-box tuning (``tune = true``, or a table of :class:`TuneSection`); off by default."""

    @property
    def source(self) -> str:
        return "path" if self.path else "hub"


@dataclass(frozen=True)
class AgentConfig:
    """The whole validated configuration."""

    agent: AgentSection = field(default_factory=AgentSection)
    http: HttpSection = field(default_factory=HttpSection)
    grpc: GrpcSection = field(default_factory=GrpcSection)
    hub: HubSection = field(default_factory=HubSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    models: tuple[ModelSection, ...] = ()
    source: str = ""
    """Where the configuration came from (a path, or ``embedded defaults``)."""
    ignored_env: tuple[str, ...] = ()
    """``EDGEAGENT_*`` variables that are not overrides (no ``__``): ignored, to be warned of."""

    def state_path(self, env: Mapping[str, str]) -> Path:
        """The state directory: configured, else ``$STATE_DIRECTORY``, else ./edgeagent-data."""
        if self.agent.state_dir:
            return Path(self.agent.state_dir)
        systemd_dir = env.get("STATE_DIRECTORY", "")
        if systemd_dir:
            # systemd may pass several colon-separated directories; the first is ours.
            return Path(systemd_dir.split(":")[0])
        return Path("edgeagent-data")

    def cache_path(self, env: Mapping[str, str]) -> Path:
        """Where rebuildable caches go (TensorRT engines): ``$CACHE_DIRECTORY`` under systemd
        (``CacheDirectory=``, /var/cache/edgeagent), else the state directory."""
        systemd_dir = env.get("CACHE_DIRECTORY", "")
        if systemd_dir:
            return Path(systemd_dir.split(":")[0])
        return self.state_path(env)

    def model(self, name: str) -> ModelSection | None:
        return next((m for m in self.models if m.name == name), None)


_SECTIONS: dict[str, type[Any]] = {
    "agent": AgentSection,
    "http": HttpSection,
    "grpc": GrpcSection,
    "hub": HubSection,
    "mqtt": MqttSection,
    "metrics": MetricsSection,
}
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _type_name(tp: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if tp in names:
        return names[tp]
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check one value against a dataclass field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        allowed = " or ".join(_type_name(o) for o in typing.get_args(tp) if o is not type(None))
        raise ConfigError(f"expected {allowed}, got {value!r}", key)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"expected a list, got {value!r}", key)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """Check one value against a scalar annotation (bool, int, float, str)."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number, got {value!r}", key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", key)
        return value
    raise AssertionError(f"unsupported annotation {tp!r}")  # a bug in this module


def _build(cls: type[Any], data: Any, key: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table, got {data!r}", key)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(fields)
        raise ConfigError(f"unknown key {unknown[0]!r} (known keys: {known})", key)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{key}.{name}" if key else name)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError("missing required key", f"{key}.{missing[0]}")
    return cls(**kwargs)


def _build_model(data: Any, key: str) -> ModelSection:
    """One ``[[models]]`` table; ``tune`` is ``true``/``false`` or a table."""
    if not isinstance(data, Mapping) or "tune" not in data:
        built: ModelSection = _build(ModelSection, data, key)
        return built
    rest = {k: v for k, v in data.items() if k != "tune"}
    raw = data["tune"]
    if isinstance(raw, bool):
        tune = TuneSection(enabled=raw)
    elif isinstance(raw, Mapping):
        tune = _build(TuneSection, raw, f"{key}.tune")
    else:
        raise ConfigError(f"expected true, false or a table, got {raw!r}", f"{key}.tune")
    model: ModelSection = _build(ModelSection, rest, key)
    return dataclasses.replace(model, tune=tune)


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"must be {'>= 0' if allow_zero else '> 0'}, got {value}", key)


def _check_listen(listen: str, key: str = "http.listen", example: str = "127.0.0.1:8080") -> None:
    if listen.startswith("unix:"):
        if not listen[5:]:
            raise ConfigError("unix: needs a socket path (unix:/run/edgeagent/api.sock)", key)
        return
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT ({example}) or unix:PATH, got {listen!r}", key)
    bare = host.strip("[]")
    if bare != "localhost":
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            raise ConfigError(
                f"{host!r} is not an IP address; use an address (0.0.0.0, 127.0.0.1, [::1])",
                key,
            ) from None


def _validate(cfg: AgentConfig) -> None:
    """Cross-field rules that the types alone do not express."""
    _validate_agent_http(cfg.agent, cfg.http)
    if cfg.grpc.listen:
        _check_listen(cfg.grpc.listen, "grpc.listen", "127.0.0.1:8001")
    _validate_hub(cfg.hub)
    _validate_mqtt(cfg.mqtt)
    if cfg.metrics.listen:
        _check_listen(cfg.metrics.listen, "metrics.listen")
        if cfg.metrics.listen == cfg.http.listen:
            raise ConfigError("must differ from http.listen (/metrics is served there already)",
                              "metrics.listen")
    _validate_models(cfg.models, cfg.hub)


def _validate_agent_http(a: AgentSection, h: HttpSection) -> None:
    if a.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"expected one of {', '.join(_LOG_LEVELS)}", "agent.log_level")
    if a.log_format not in ("auto", "text", "json"):
        raise ConfigError("expected auto, text or json", "agent.log_format")
    _positive(a.shutdown_grace_s, "agent.shutdown_grace_s", allow_zero=True)
    _check_listen(h.listen)
    for key in ("max_request_bytes", "max_header_bytes", "max_tensor_elements",
                "max_bytes_elements", "header_timeout_s", "body_timeout_s",
                "keepalive_timeout_s", "max_connections"):
        _positive(getattr(h, key), f"http.{key}")


def _validate_hub(hub: HubSection) -> None:
    if hub.url and not hub.url.startswith(("http://", "https://", "file://")):
        raise ConfigError("expected an http://, https:// or file:// URL", "hub.url")
    if hub.url and not hub.root:
        raise ConfigError(
            "a hub needs its trusted root metadata: set hub.root to the root.json that "
            "'edgeconvert hub init' printed",
            "hub.root",
        )
    _positive(hub.poll_interval_s, "hub.poll_interval_s")
    _positive(hub.keep_versions, "hub.keep_versions", allow_zero=True)
    _positive(hub.disk_budget_mb, "hub.disk_budget_mb", allow_zero=True)
    for key in ("timeout_s", "file_timeout_s", "min_rate_bytes_s"):
        _positive(getattr(hub, key), f"hub.{key}")
    _positive(hub.retries, "hub.retries", allow_zero=True)


def _validate_mqtt(m: MqttSection) -> None:
    if m.url and not m.url.startswith(("mqtt://", "mqtts://")):
        raise ConfigError("expected an mqtt:// or mqtts:// URL", "mqtt.url")
    if m.protocol not in ("5", "3.1.1"):
        raise ConfigError('expected "5" or "3.1.1"', "mqtt.protocol")
    if bool(m.cert_file) != bool(m.key_file):
        raise ConfigError("a client certificate needs both cert_file and key_file",
                          "mqtt.cert_file")
    for key in ("keepalive_s", "telemetry_interval_s", "reported_interval_s", "spool_max_messages",
                "spool_max_bytes"):
        _positive(getattr(m, key), f"mqtt.{key}")
    if not m.topic_prefix or any(c in m.topic_prefix for c in "#+"):
        raise ConfigError("must be non-empty and free of MQTT wildcards", "mqtt.topic_prefix")


def _validate_models(models: tuple[ModelSection, ...], hub: HubSection) -> None:
    seen: set[str] = set()
    for i, model in enumerate(models):
        key = f"models[{i}]"
        if not model.name or not all(c.isalnum() or c in "-_." for c in model.name):
            raise ConfigError("a model name uses letters, digits, '-', '_' and '.' only",
                              f"{key}.name")
        if model.name in seen:
            raise ConfigError(f"model {model.name!r} is configured twice", f"{key}.name")
        seen.add(model.name)
        if model.path and model.version is not None:
            raise ConfigError(
                "give either version (from the hub) or path (local file), not both", key)
        if not model.path and model.version is None:
            raise ConfigError("give version (an integer or \"latest\") or path", key)
        if isinstance(model.version, str) and model.version != "latest":
            raise ConfigError('expected an integer or "latest"', f"{key}.version")
        if isinstance(model.version, int) and model.version < 1:
            raise ConfigError("versions start at 1", f"{key}.version")
        if model.version is not None and not hub.url:
            raise ConfigError("a model from the hub needs [hub] url", f"{key}.version")
        if model.path and not model.path.endswith((".onnx", ".tflite")):
            raise ConfigError("expected a .onnx or .tflite file", f"{key}.path")
        _positive(model.max_batch_size, f"{key}.max_batch_size", allow_zero=True)
        _positive(model.max_queue_delay_ms, f"{key}.max_queue_delay_ms", allow_zero=True)
        _positive(model.max_queue_size, f"{key}.max_queue_size")
        _positive(model.max_concurrency, f"{key}.max_concurrency")
        _validate_overrides(model, key)


_PRECISIONS = ("fp32", "fp16", "int8")


def _validate_overrides(model: ModelSection, key: str) -> None:
    """The per-model overrides: providers, precision, variant, threads, tune."""
    for i, name in enumerate(model.providers):
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError("a provider or delegate name (CUDAExecutionProvider, xnnpack)",
                              f"{key}.providers[{i}]")
    if len(set(model.providers)) != len(model.providers):
        raise ConfigError("a provider is listed twice", f"{key}.providers")
    if model.precision and model.precision not in _PRECISIONS:
        raise ConfigError(f"expected one of {', '.join(_PRECISIONS)}", f"{key}.precision")
    if model.variant:
        if model.path:
            raise ConfigError("a path model has one file; variant is for hub models",
                              f"{key}.variant")
        if "/" in model.variant or "\\" in model.variant or model.variant.startswith("."):
            raise ConfigError("expected a bundle variant's file name (model-int8.onnx)",
                              f"{key}.variant")
    if model.threads is not None:
        _positive(model.threads, f"{key}.threads", allow_zero=True)
    _validate_tune(model, key)


def _validate_tune(model: ModelSection, key: str) -> None:
    t = model.tune
    if t.objective not in TUNE_OBJECTIVES:
        raise ConfigError(f"expected {' or '.join(TUNE_OBJECTIVES)}", f"{key}.tune.objective")
    _positive(t.budget_s, f"{key}.tune.budget_s")
    for name in ("max_memory_mb", "max_p99_ms", "min_gain"):
        _positive(getattr(t, name), f"{key}.tune.{name}", allow_zero=True)
    for name in ("threads", "batch_sizes"):
        for i, n in enumerate(getattr(t, name)):
            _positive(n, f"{key}.tune.{name}[{i}]")
    if t.batch_sizes and not model.max_batch_size:
        raise ConfigError("batch sizes are tuned only with batching on (max_batch_size > 0)",
                          f"{key}.tune.batch_sizes")
    if any(b > model.max_batch_size for b in t.batch_sizes):
        raise ConfigError(f"a batch size above max_batch_size ({model.max_batch_size})",
                          f"{key}.tune.batch_sizes")


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


#: ``EDGEAGENT_*`` names that are not overrides and are documented (``EDGEAGENT_CONFIG``).
ENV_NAMES = ("EDGEAGENT_CONFIG",)


def _apply_env(data: dict[str, Any], env: Mapping[str, str]
               ) -> tuple[dict[str, Any], dict[str, str], tuple[str, ...]]:
    """Apply ``EDGEAGENT_<SECTION>__<KEY>`` overrides.

    Returns:
        The merged document, the key paths set from the environment (key path -> variable, so
        an error in one is blamed on the variable, not the file), and the ``EDGEAGENT_*`` names
        without ``__`` (a wrapper script's ``EDGEAGENT_VENV``, say): not overrides, ignored.
    """
    from_env: dict[str, str] = {}
    ignored: list[str] = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_NAMES:
            continue
        section, sep, key = name[len(ENV_PREFIX):].lower().partition("__")
        if not sep:
            ignored.append(name)
            continue
        if section not in _SECTIONS or not key:
            raise ConfigError(
                f"not a configuration override; use {ENV_PREFIX}<SECTION>__<KEY> with a section "
                f"among {', '.join(_SECTIONS)}",
                source=name,
            )
        known = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        if key not in known:
            raise ConfigError(f"unknown key {key!r} (known keys: {', '.join(known)})",
                              f"{section}.{key}", source=name)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError("expected a table", section)
        table[key] = _env_value(raw)
        from_env[f"{section}.{key}"] = name
    return data, from_env, tuple(ignored)


def parse_config(
    data: Mapping[str, Any], env: Mapping[str, str] | None = None, source: str = ""
) -> AgentConfig:
    """Validate a configuration mapping (parsed TOML) with environment overrides applied.

    Args:
        data: The parsed document.
        env: Environment variables (only ``EDGEAGENT_*`` ones are read); ``None`` = none.
        source: Where the document came from, for error messages.

    Raises:
        ConfigError: naming the key path and what is wrong.
    """
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    from_env: dict[str, str] = {}
    try:
        merged, from_env, ignored = _apply_env(merged, env or {})
        unknown = sorted(set(merged) - set(_SECTIONS) - {"models"})
        if unknown:
            raise ConfigError(
                f"unknown section {unknown[0]!r} (known: {', '.join([*_SECTIONS, 'models'])})"
            )
        kwargs: dict[str, Any] = {
            name: _build(cls, merged.get(name, {}), name) for name, cls in _SECTIONS.items()
        }
        models = merged.get("models", [])
        if not isinstance(models, list):
            raise ConfigError("expected an array of tables ([[models]])", "models")
        kwargs["models"] = tuple(_build_model(m, f"models[{i}]") for i, m in enumerate(models))
        cfg = AgentConfig(**kwargs, source=source or "embedded defaults", ignored_env=ignored)
        _validate(cfg)
    except ConfigError as exc:
        if not exc.source and exc.key_path in from_env:
            # The value came from the environment: blame the variable, not the file.
            message = str(exc).removeprefix(f"{exc.key_path}: ")
            raise ConfigError(message, exc.key_path, from_env[exc.key_path]) from None
        if source and not exc.source:
            raise ConfigError(exc.message, exc.key_path, source) from None
        raise
    return cfg


def config_path(explicit: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The configuration file to read, and whether it was asked for explicitly."""
    if explicit:
        return Path(explicit), True
    if env.get("EDGEAGENT_CONFIG"):
        return Path(env["EDGEAGENT_CONFIG"]), True
    return DEFAULT_CONFIG_PATH, False


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and validate the configuration.

    A file named explicitly (argument or ``EDGEAGENT_CONFIG``) must exist; the default path may
    be absent, and then the embedded defaults apply (plus environment overrides).

    Raises:
        ConfigError: for a missing explicit file, bad TOML, or an invalid value.
    """
    env = env or {}
    file, explicit = config_path(path, env)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError("no such file", source=str(file)) from None
        return parse_config({}, env)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(file)) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(file)) from exc
    return parse_config(data, env, source=str(file))


def config_dir(config: AgentConfig) -> Path:
    """What relative paths in a configuration are relative to: its file's folder (the working
    directory for embedded defaults)."""
    return Path(config.source).parent if config.source.endswith(".toml") else Path.cwd()


def is_loopback_listen(listen: str) -> bool:
    """Whether an ``http.listen`` value is reachable from this box only."""
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    return ipaddress.ip_address(host).is_loopback


def read_token(config: AgentConfig) -> str | None:
    """The API token from ``http.token_file``; refuse to serve beyond loopback without one."""
    token = None
    if config.http.token_file:
        try:
            token = Path(config.http.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file: {exc.strerror}",
                              "http.token_file") from exc
        if len(token) < 16:
            raise ConfigError("the token must be at least 16 characters", "http.token_file")
    if token is None and not is_loopback_listen(config.http.listen):
        raise ConfigError(
            f"{config.http.listen} is reachable from other hosts; set http.token_file "
            "(a file holding a bearer token) or listen on 127.0.0.1",
            "http.listen",
        )
    if token is None and config.grpc.listen and not is_loopback_listen(config.grpc.listen):
        raise ConfigError(
            f"{config.grpc.listen} is reachable from other hosts; set http.token_file "
            "(its token guards gRPC too) or listen on 127.0.0.1",
            "grpc.listen",
        )
    return token


def read_metrics_token(config: AgentConfig, http_token: str | None) -> str | None:
    """The metrics listener's token: ``metrics.token_file``, else the HTTP token; refuse to
    serve metrics beyond loopback without one (the rule ``[http]`` follows)."""
    token = http_token
    if config.metrics.token_file:
        try:
            token = Path(config.metrics.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file: {exc.strerror}",
                              "metrics.token_file") from exc
        if len(token) < 16:
            raise ConfigError("the token must be at least 16 characters", "metrics.token_file")
    if (token is None and config.metrics.listen
            and not is_loopback_listen(config.metrics.listen)):
        raise ConfigError(
            f"{config.metrics.listen} is reachable from other hosts; set metrics.token_file "
            "(or http.token_file) or listen on 127.0.0.1",
            "metrics.listen",
        )
    return token
