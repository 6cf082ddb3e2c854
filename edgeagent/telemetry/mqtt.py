"""An asyncio-friendly MQTT client on paho-mqtt 2.

paho runs its own network thread (``loop_start``); every callback is handed to the event loop
with ``call_soon_threadsafe``. A QoS 1 publish waits on a future keyed by its message id, set
when the PUBACK arrives (as aiomqtt 2's ``_pending_calls`` do). The client counts as connected
only after a successful CONNACK.

Each connection attempt uses a fresh paho client with a clean session, and a connection that
ends fails every publish still waiting for its PUBACK: nothing is re-sent behind the caller's
back, so the telemetry spool stays the only place that decides what is sent again and in which
order. Reconnection uses exponential backoff with jitter; subscriptions are restored on every
connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent.config import MqttSection
from edgeagent.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

#: Seconds a blocking TCP/TLS connect may take before the attempt counts as failed.
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Message:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class Will:
    """The last will: what the broker publishes if we vanish without a DISCONNECT."""

    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to authenticate: parsed and checked once, at start-up."""

    host: str
    port: int
    protocol: str = "5"
    username: str = ""
    password: str | None = None
    tls: ssl.SSLContext | None = None
    keepalive_s: int = 60
    client_id: str = field(default_factory=lambda: f"edgeagent-{uuid.uuid4().hex[:12]}")

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @classmethod
    def from_section(cls, m: MqttSection, client_id: str, url: str = "") -> BrokerSettings:
        """Build settings from ``[mqtt]`` (``url`` overrides ``m.url``, as ``--broker`` does).

        Reads the password file and builds the TLS context, so a missing or unreadable file
        fails here, naming its key, instead of on every reconnect.

        Raises:
            ConfigError: a bad URL, an unreadable password, CA, certificate or key file.
        """
        url = url or m.url
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url!r}",
                              "mqtt.url")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError as exc:
            raise ConfigError(f"bad port in {url!r}", "mqtt.url") from exc
        password = None
        if m.password_file:
            try:
                password = Path(m.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read: {exc.strerror}", "mqtt.password_file") from exc
        tls = None
        if parts.scheme == "mqtts":
            tls = _tls_context(m)
        elif m.ca_file or m.cert_file:
            raise ConfigError("a CA or client certificate needs an mqtts:// URL", "mqtt.url")
        return cls(parts.hostname, port, m.protocol, m.username or (parts.username or ""),
                   password, tls, m.keepalive_s, client_id)


def _tls_context(m: MqttSection) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=m.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA file: {exc}", "mqtt.ca_file") from exc
    if m.cert_file:
        try:
            ctx.load_cert_chain(m.cert_file, m.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client certificate and key: {exc}",
                              "mqtt.cert_file") from exc
    return ctx


def closed_during_connect(tls: bool, detail: str = "") -> str:
    """Why the broker dropped a connection before its CONNACK, with what to check.

    Over TLS this is what a rejected client certificate looks like from the client's side
    (with TLS 1.3 the handshake completes first, then the broker closes), so say so.
    """
    where = f" ({detail})" if detail else ""
    if tls:
        return (f"the broker closed the connection during connect{where}: certificate "
                "rejected, or TLS settings wrong? check mqtt.ca_file / cert_file / key_file")
    return (f"the broker closed the connection during connect{where}: is it an MQTT broker, "
            "and does it speak mqtt.protocol?")


def describe_connect_error(exc: OSError, address: str, tls: bool = False) -> str:
    """One line saying why a TCP/TLS connect (up to sending CONNECT) failed and what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the broker's certificate is not trusted ({exc.verify_message}); "
                "check mqtt.ca_file and the host name in mqtt.url")
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused: is a broker listening on {address}?"
    if isinstance(exc, TimeoutError):
        return f"no answer from {address} within {CONNECT_TIMEOUT_S:.0f} s"
    # ssl sets .reason on the errors it raises; one built elsewhere may lack it.
    reason = (getattr(exc, "reason", None) or str(exc)) if isinstance(exc, ssl.SSLError) else ""
    # An alert about a certificate, or the broker hanging up mid-handshake, is a rejection.
    if isinstance(exc, ssl.SSLError) and "CERTIFICATE" not in reason.upper() and not isinstance(
            exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return f"TLS handshake failed ({reason}); check mqtt.ca_file / cert_file / key_file"
    if isinstance(exc, ssl.SSLError | ConnectionError):  # reset, broken pipe, lost at CONNECT
        detail = f"TLS: {reason}" if reason else str(exc)
        return closed_during_connect(tls or isinstance(exc, ssl.SSLError), detail)
    return f"cannot connect to {address}: {exc.strerror or exc}"


def describe_refusal(reason: ReasonCode) -> str:
    """Why the broker refused a CONNECT, with what to check."""
    name = str(reason)
    hint = ""
    if reason.value in (0x86, 0x04):  # MQTT 5 / 3.1.1 "bad user name or password"
        hint = "; check mqtt.username and mqtt.password_file"
    elif reason.value in (0x87, 0x05):  # "not authorized"
        hint = "; check the credentials or the client certificate, and the broker's ACLs"
    return f"the broker refused the connection: {name}{hint}"


Handler = Callable[[Message], Awaitable[None]]


class _Session:
    """One paho client and its connection attempt."""

    def __init__(self, client: paho.Client, ended: asyncio.Future[None]) -> None:
        self.client = client
        self.ended = ended
        self.acked = False
        self.pending: dict[int, asyncio.Future[None]] = {}


class MqttClient:
    """A long-lived MQTT connection that reconnects by itself.

    Args:
        settings: The broker and credentials.
        will: The last will, set on every connection.
        on_connect: Awaited after each successful CONNACK, once subscriptions are sent.
        backoff: Smallest and largest delay between connection attempts, in seconds.
    """

    def __init__(self, settings: BrokerSettings, *, will: Will | None = None,
                 on_connect: Callable[[], Awaitable[None]] | None = None,
                 backoff: tuple[float, float] = (0.5, 30.0)) -> None:
        self.settings = settings
        self.will = will
        self._on_connect = on_connect
        self._backoff = backoff
        self._handlers: list[tuple[str, int, Handler]] = []
        self._session: _Session | None = None
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_error = ""
        self.connects = 0
        """Successful CONNACKs so far (1 after the first connection)."""

    # ---- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def status(self) -> dict[str, Any]:
        """For ``edgeagent status``: where, whether connected, and the last error."""
        return {"broker": self.settings.address, "connected": self.connected,
                "connects": self.connects, "last_error": self.last_error}

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until connected (CONNACK received); False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._run(), name="mqtt-connection"),
                       asyncio.create_task(self._dispatch(), name="mqtt-dispatch")]

    async def stop(self) -> None:
        """Disconnect cleanly (so the broker does not publish the will) and stop.

        Returns once paho's network thread has ended, so no callback outlives the event loop.
        """
        self._stop.set()
        if self._tasks:
            await self._tasks[0]
            self._tasks[1].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tasks[1]
        self._tasks = []

    def _make_client(self) -> paho.Client:
        s = self.settings
        v5 = s.protocol == "5"
        # Reconnection is ours (with jitter, and a fresh client and session each time; see the
        # module doc). paho 2 reads reconnect_on_failure in the constructor only: left on, its
        # thread could reconnect the old client (same client id) while we start a new one.
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id,
                             protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                             clean_session=None if v5 else True, reconnect_on_failure=False)
        client.connect_timeout = CONNECT_TIMEOUT_S
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            client.tls_set_context(s.tls)
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        client.on_message = self._paho_message
        return client

    async def _run(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            session = _Session(self._make_client(), asyncio.get_running_loop().create_future())
            self._session = session
            try:
                await self._serve(session)
            finally:
                # Also when cancelled (a loop shut down without stop()): paho's thread is
                # joined before the loop can close.
                await self._release(session)
            if session.acked:
                delay = self._backoff[0]
            if self._stop.is_set():
                break
            wait = random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not security
            log.warning("MQTT %s: %s; retrying in %.1f s", self.settings.address,
                        self.last_error or "disconnected", wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)
            delay = min(delay * 2, self._backoff[1])

    async def _serve(self, session: _Session) -> None:
        """Connect, then wait until the connection ends or stop() is asked for."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._connect_blocking, session.client)
        except OSError as exc:
            self.last_error = describe_connect_error(exc, self.settings.address,
                                                     self.settings.tls is not None)
            return
        session.client.loop_start()
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({session.ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not session.ended.done():
            session.client.disconnect()  # a clean DISCONNECT: no last will
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(session.ended), 5.0)

    async def _release(self, session: _Session) -> None:
        """Join paho's thread (it ends by itself once disconnected), then drop the session."""
        join = asyncio.get_running_loop().run_in_executor(None, session.client.loop_stop)
        try:
            # Shielded: a second cancellation must not skip the join (asyncio.run waits for
            # the executor before closing the loop).
            await asyncio.shield(join)
        finally:
            self._close_session(session, "the connection closed before the broker acknowledged")

    def _connect_blocking(self, client: paho.Client) -> None:
        s = self.settings
        rc = client.connect(s.host, s.port, s.keepalive_s)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # The CONNECT could not be sent: the broker hung up right after accepting the
            # socket (or the TLS handshake), as it does with a rejected client certificate.
            raise ConnectionError(paho.error_string(rc))

    def _close_session(self, session: _Session, why: str) -> None:
        if self._session is session:
            self._session = None
        if not session.ended.done():
            session.ended.set_result(None)
        self._connected.clear()
        for fut in session.pending.values():
            if not fut.done():
                fut.set_exception(BrokerError(why))
        session.pending.clear()

    # ---- paho callbacks, on paho's thread: handed to the loop ------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        # stop() (or a cancelled _run) joins paho's thread before the loop closes; this guards
        # a loop closed without either, where call_soon_threadsafe would raise in paho's thread.
        if loop is None or loop.is_closed() or not loop.is_running():
            return
        with contextlib.suppress(RuntimeError):  # closed between the check and the call
            loop.call_soon_threadsafe(fn, *args)

    def _paho_connect(self, client: paho.Client, _userdata: Any, _flags: paho.ConnectFlags,
                      reason: ReasonCode, _props: Properties | None) -> None:
        self._post(self._connack, client, reason)

    def _paho_disconnect(self, client: paho.Client, _userdata: Any, _flags: paho.DisconnectFlags,
                         reason: ReasonCode, _props: Properties | None) -> None:
        self._post(self._ended, client, reason)

    def _paho_publish(self, client: paho.Client, _userdata: Any, mid: int, reason: ReasonCode,
                      _props: Properties) -> None:
        self._post(self._puback, client, mid, reason)

    def _paho_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        # The transport's boundary, on paho's thread: an exception here would end paho's
        # network loop (and with it the connection), so nothing may escape.
        try:
            message = Message(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception as exc:  # a topic that is not UTF-8 (a broker should refuse those)
            log.warning("MQTT: dropped a message whose topic cannot be read (%s: %s)",
                        type(exc).__name__, exc)
            return
        self._post(self._inbox.put_nowait, message)

    # ---- the same, on the event loop -------------------------------------------------------

    def _connack(self, client: paho.Client, reason: ReasonCode) -> None:
        session = self._session
        if session is None or session.client is not client:
            return
        if reason.is_failure:
            self.last_error = describe_refusal(reason)
            log.error("MQTT %s: %s", self.settings.address, self.last_error)
            return  # the broker closes the connection; _run backs off and retries
        session.acked = True
        self.connects += 1
        self.last_error = ""
        log.info("MQTT connected to %s as %s", self.settings.address, self.settings.client_id)
        if self._handlers:
            client.subscribe([(f, qos) for f, qos, _ in self._handlers])
        self._connected.set()
        if self._on_connect is not None:
            task = asyncio.ensure_future(self._on_connect())
            task.add_done_callback(_log_failure)

    def _ended(self, client: paho.Client, reason: ReasonCode) -> None:
        session = self._session
        if session is None or session.client is not client:
            return
        if session.acked and not self._stop.is_set():
            self.last_error = f"connection lost ({reason})"
        elif not session.acked and not self.last_error.startswith("the broker refused"):
            self.last_error = closed_during_connect(self.settings.tls is not None)
        self._close_session(session, f"connection lost before the broker acknowledged ({reason})")

    def _puback(self, client: paho.Client, mid: int, reason: ReasonCode) -> None:
        session = self._session
        if session is None or session.client is not client:
            return
        fut = session.pending.pop(mid, None)
        if fut is None or fut.done():
            return
        if reason.is_failure:
            fut.set_exception(BrokerError(f"the broker did not accept the message: {reason}"))
        else:
            fut.set_result(None)

    # ---- use -----------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call ``handler`` (in order, one at a time) for each message on ``topic_filter``.

        The subscription is (re)sent on every connect.
        """
        self._handlers.append((topic_filter, qos, handler))
        session = self._session
        if session is not None and self.connected:
            session.client.subscribe(topic_filter, qos)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                      retain: bool = False) -> None:
        """Publish; at QoS 1, return once the broker acknowledged it.

        Raises:
            BrokerError: not connected, the connection ended before the PUBACK, or the broker
                refused the message.
        """
        session = self._session
        if session is None or not self.connected:
            raise BrokerError(f"not connected to {self.settings.address}"
                              + (f": {self.last_error}" if self.last_error else ""))
        info = session.client.publish(topic, payload, qos, retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        # The PUBACK callback reaches the loop through call_soon_threadsafe, so it runs after
        # this synchronous step has registered the future.
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        session.pending[info.mid] = fut
        await fut

    async def _dispatch(self) -> None:
        """Hand each message to its handlers, in order; the loop's boundary: a handler that
        raises is logged once and delivery goes on (handlers answer their own messages)."""
        while True:
            msg = await self._inbox.get()
            for topic_filter, _qos, handler in list(self._handlers):
                if paho.topic_matches_sub(topic_filter, msg.topic):
                    try:
                        await handler(msg)
                    except Exception:  # a bad handler must not stop message delivery
                        log.exception("MQTT handler for %s failed on %s", topic_filter,
                                      msg.topic[:200])


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("MQTT on-connect hook failed", exc_info=task.exception())
