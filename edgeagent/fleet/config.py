"""The fleet controller's configuration file (``fleet.toml``), validated without I/O.

Default path ``/etc/edgeagent/fleet.toml`` (``EDGEAGENT_FLEET_CONFIG`` overrides it); every key
has a default, so an empty file is a controller on a local broker with SQLite in ``./fleet-data``.
Sections: ``[broker]``, ``[database]``, ``[api]``, ``[inventory]``, ``[rollouts]``; unknown keys
are errors. ``docs/fleet.md`` documents each key.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeagent.config import MqttSection, _build, _check_listen, is_loopback_listen
from edgeagent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_PATH = Path("/etc/edgeagent/fleet.toml")
#: The API's default port: clear of the agent's 8080 (HTTP) and 8001 (gRPC).
DEFAULT_LISTEN = "127.0.0.1:8090"


@dataclass(frozen=True)
class BrokerSection:
    """``[broker]``: the MQTT broker (cluster) the fleet talks through."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    topic_prefix: str = "edgeagent"
    #: The shared-subscription group: replicas in one group split the fleet's messages.
    share_group: str = "edgeagent-fleet"
    client_id: str = ""
    keepalive_s: int = 60
    #: Devices whose retained state one catch-up step asks for (2 topics each): well under a
    #: stock Mosquitto's 1,000 queued messages per client.
    catchup_batch: int = 200
    #: MQTT connections of this replica in the shared group: a burst of device messages
    #: spreads over their per-client queues (a stock Mosquitto drops past 1,000 each).
    connections: int = 4

    def mqtt_section(self) -> MqttSection:
        """The agent's ``[mqtt]`` shape, so the one broker-settings parser (TLS, password
        file) serves both."""
        return MqttSection(url=self.url, username=self.username,
                           password_file=self.password_file, ca_file=self.ca_file,
                           cert_file=self.cert_file, key_file=self.key_file,
                           topic_prefix=self.topic_prefix, keepalive_s=self.keepalive_s)


@dataclass(frozen=True)
class DatabaseSection:
    """``[database]``: ``url`` is a SQLite file path (or ``sqlite:///PATH``) or a
    ``postgresql://`` URL; empty means ``{state_dir}/fleet.db``."""

    url: str = ""
    state_dir: str = "./fleet-data"


@dataclass(frozen=True)
class ApiSection:
    """``[api]``: the JSON API (and, later, the web console) on its own port."""

    listen: str = DEFAULT_LISTEN
    #: A file holding the bearer token; empty means ``{state_dir}/api-token``, created (0600)
    #: on first start.
    token_file: str = ""


@dataclass(frozen=True)
class InventorySection:
    """``[inventory]``: how long devices and telemetry stay in view."""

    #: A device silent this long is not reached by a rollout (2 x the agents' default
    #: reported interval of 300 s, plus jitter).
    offline_after_s: float = 660.0
    #: A device silent this long leaves the inventory's view (its rows are deleted).
    stale_after_s: float = 7 * 86400.0
    #: Telemetry kept per device: this window, at most ``telemetry_max_points`` messages.
    telemetry_window_s: float = 3600.0
    telemetry_max_points: int = 120
    #: Largest device message accepted (bigger ones are counted and dropped).
    max_message_bytes: int = 256 * 1024


@dataclass(frozen=True)
class RolloutsSection:
    """``[rollouts]``: defaults of ``rollout start`` (each can be given per rollout)."""

    waves: str = "1%,10%,50%,100%"
    min_devices: int = 10
    max_failures: str = "5%"
    wave_timeout_s: float = 600.0
    #: How often the leader re-counts its rollouts.
    tick_s: float = 0.5


@dataclass(frozen=True)
class FleetConfig:
    broker: BrokerSection = field(default_factory=BrokerSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    api: ApiSection = field(default_factory=ApiSection)
    inventory: InventorySection = field(default_factory=InventorySection)
    rollouts: RolloutsSection = field(default_factory=RolloutsSection)
    source: str = ""

    @property
    def state_dir(self) -> Path:
        d = Path(self.database.state_dir)
        if not d.is_absolute() and self.source.endswith(".toml"):
            d = Path(self.source).parent / d
        return d

    @property
    def database_url(self) -> str:
        return self.database.url or str(self.state_dir / "fleet.db")

    @property
    def token_path(self) -> Path:
        if self.api.token_file:
            p = Path(self.api.token_file)
            if not p.is_absolute() and self.source.endswith(".toml"):
                p = Path(self.source).parent / p
            return p
        return self.state_dir / "api-token"


def parse_waves(text: str, key: str = "rollouts.waves") -> tuple[float, ...]:
    """``1%,10%,50%,100%`` -> (1.0, 10.0, 50.0, 100.0): increasing, ending at 100.

    Raises:
        ConfigError: not percentages, not increasing, or not ending at 100 %.
    """
    try:
        waves = tuple(float(p.strip().rstrip("%")) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"expected percentages like 1%,10%,50%,100%, got {text!r}",
                          key) from None
    if (not waves or waves[0] <= 0 or waves[-1] != 100.0
            or any(b <= a for a, b in itertools.pairwise(waves))):
        raise ConfigError(f"expected increasing percentages ending at 100%, got {text!r}", key)
    return waves


def parse_percent(text: str, key: str = "rollouts.max_failures") -> float:
    """``5%`` -> 5.0 (0 to 100).

    Raises:
        ConfigError: not a percentage from 0 % to 100 %.
    """
    try:
        value = float(str(text).strip().rstrip("%"))
    except ValueError:
        raise ConfigError(f"expected a percentage like 5%, got {text!r}", key) from None
    if not 0 <= value <= 100:
        raise ConfigError(f"expected a percentage from 0% to 100%, got {text!r}", key)
    return value


def _validate(cfg: FleetConfig) -> None:  # noqa: PLR0912 - one rule per key
    b = cfg.broker
    parts = urlsplit(b.url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {b.url!r}",
                          "broker.url")
    if not b.topic_prefix or any(c in b.topic_prefix for c in "#+"):
        raise ConfigError(f"expected a topic prefix without wildcards, got {b.topic_prefix!r}",
                          "broker.topic_prefix")
    if not b.share_group or any(c in b.share_group for c in "#+/"):
        raise ConfigError(f"expected a name without '/', '+' or '#', got {b.share_group!r}",
                          "broker.share_group")
    if not 1 <= b.catchup_batch <= 450:
        raise ConfigError("expected 1 to 450 devices (2 retained messages each must stay "
                          f"under a stock broker's 1,000 queued), got {b.catchup_batch}",
                          "broker.catchup_batch")
    if not 1 <= b.connections <= 32:
        raise ConfigError(f"expected 1 to 32, got {b.connections}", "broker.connections")
    url = cfg.database.url
    if url and "://" in url and not url.startswith(("sqlite:///", "postgresql://",
                                                    "postgres://")):
        raise ConfigError(f"expected a file path, sqlite:///PATH or postgresql://..., got {url!r}",
                          "database.url")
    try:
        _check_listen(cfg.api.listen)
    except ConfigError as exc:
        raise ConfigError(str(exc).removeprefix("http.listen: "), "api.listen") from None
    if cfg.api.listen.startswith("unix:"):
        raise ConfigError("expected HOST:PORT (the API serves TCP)", "api.listen")
    inv = cfg.inventory
    for name in ("offline_after_s", "stale_after_s", "telemetry_window_s"):
        if getattr(inv, name) <= 0:
            raise ConfigError(f"must be > 0, got {getattr(inv, name)}", f"inventory.{name}")
    if inv.stale_after_s < inv.offline_after_s:
        raise ConfigError("must be at least inventory.offline_after_s", "inventory.stale_after_s")
    if inv.telemetry_max_points < 1 or inv.max_message_bytes < 1024:
        raise ConfigError("telemetry_max_points must be >= 1 and max_message_bytes >= 1024",
                          "inventory")
    r = cfg.rollouts
    parse_waves(r.waves)
    parse_percent(r.max_failures)
    if r.min_devices < 0:
        raise ConfigError(f"must be >= 0, got {r.min_devices}", "rollouts.min_devices")
    if r.wave_timeout_s <= 0 or r.tick_s <= 0:
        raise ConfigError("wave_timeout_s and tick_s must be > 0", "rollouts")


def parse_fleet_config(data: Mapping[str, Any], source: str = "") -> FleetConfig:
    """Build and validate a configuration from parsed TOML.

    Raises:
        ConfigError: naming the key path (``api.listen``) and the file.
    """
    sections = {"broker": BrokerSection, "database": DatabaseSection, "api": ApiSection,
                "inventory": InventorySection, "rollouts": RolloutsSection}
    try:
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"unknown section {unknown[0]!r} (known: {', '.join(sections)})")
        built = {name: _build(cls, data.get(name, {}), name) for name, cls in sections.items()}
        cfg = FleetConfig(**built, source=source)
        _validate(cfg)
    except ConfigError as exc:
        if source and not exc.source:
            raise ConfigError(str(exc), exc.key_path, source) from None
        raise
    return cfg


def config_path(explicit: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    if explicit:
        return Path(explicit), True
    if env.get("EDGEAGENT_FLEET_CONFIG"):
        return Path(env["EDGEAGENT_FLEET_CONFIG"]), True
    return DEFAULT_PATH, False


def load_fleet_config(path: str | None, env: Mapping[str, str]) -> FleetConfig:
    """Read ``fleet.toml``: an explicit file must exist; an absent default means defaults.

    Raises:
        ConfigError: a missing explicit file, bad TOML, or an invalid value.
    """
    file, explicit = config_path(path, env)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError("no such file", source=str(file)) from None
        return parse_fleet_config({})
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(file)) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(file)) from exc
    return parse_fleet_config(data, str(file))


def needs_token_refusal(cfg: FleetConfig) -> bool:
    """The API always takes a token; beyond loopback a missing token file is fatal."""
    return not is_loopback_listen(cfg.api.listen)
