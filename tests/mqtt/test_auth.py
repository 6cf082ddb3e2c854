"""TLS with a client certificate and password authentication against a real Mosquitto; wrong
credentials give a clear error and back off instead of spinning."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.mqtt.device import Device, make_catalog
from tests.mqtt.test_link import until


def _cert(name: str, key: Any, issuer: tuple[x509.Name, Any] | None, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    iname, ikey = issuer or (subject, key)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(iname)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(ikey, hashes.SHA256())


def make_pki(d: Path, ca_name: str = "test-ca") -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_name, ca_key, None, True)
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, key, (ca.subject, ca_key), False)
        out[who] = d / f"{who}.pem"
        out[f"{who}_key"] = d / f"{who}.key"
        out[who].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return out


def test_tls_with_client_certificate(tmp_path: Path, broker_factory: Any, watch: Any) -> None:
    pki = make_pki(tmp_path / "pki")
    rogue = make_pki(tmp_path / "rogue", "rogue-ca")
    b = broker_factory("tls", extra=f"cafile {pki['ca']}\ncertfile {pki['server']}\n"
                                    f"keyfile {pki['server_key']}\nrequire_certificate true\n")
    url = f"mqtts://127.0.0.1:{b.port}"
    catalog = make_catalog(tmp_path / "models")
    good = Device(tmp_path / "s1", catalog, url=url, ca_file=str(pki["ca"]),
                  cert_file=str(pki["client"]), key_file=str(pki["client_key"]))
    bad = Device(tmp_path / "s2", catalog, device_id="dev2", url=url, ca_file=str(pki["ca"]),
                 cert_file=str(rogue["client"]), key_file=str(rogue["client_key"]))

    async def go() -> None:
        await good.start()
        await bad.start()
        assert await good.link.client.wait_connected(20)  # type: ignore[union-attr]
        client = bad.link.client
        assert client is not None
        await until(lambda: client.last_error, "the rogue certificate's error")
        await asyncio.sleep(1.0)
        # Backoff, not a spin: a handful of attempts in a second, never connected.
        assert not client.connected and client.connects == 0
        # TLS 1.3: the handshake completes, then the broker hangs up before the CONNACK.
        assert client.last_error.startswith("the broker closed the connection during connect")
        assert ("certificate rejected, or TLS settings wrong? check mqtt.ca_file / cert_file / "
                "key_file") in client.last_error, client.last_error
        await good.stop()
        await bad.stop()

    asyncio.run(go())


def test_password_auth(tmp_path: Path, broker_factory: Any) -> None:
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "dev", "s3cret-pass"],
                   check=True, capture_output=True)
    pwfile.chmod(0o600)
    b = broker_factory("auth", extra=f"password_file {pwfile}\n", anonymous=False)
    (tmp_path / "good").write_text("s3cret-pass\n")
    (tmp_path / "bad").write_text("wrong\n")
    catalog = make_catalog(tmp_path / "models")
    for protocol in ("5", "3.1.1"):
        good = Device(tmp_path / f"g{protocol}", catalog, url=b.url, username="dev",
                      password_file=str(tmp_path / "good"), protocol=protocol)
        bad = Device(tmp_path / f"b{protocol}", catalog, device_id="dev2", url=b.url,
                     username="dev", password_file=str(tmp_path / "bad"), protocol=protocol)

        async def go(good: Device = good, bad: Device = bad) -> None:
            await good.start()
            await bad.start()
            assert await good.link.client.wait_connected(20)  # type: ignore[union-attr]
            client = bad.link.client
            assert client is not None
            await until(lambda: "refused" in client.last_error, "the refusal")
            assert "check mqtt.username and mqtt.password_file" in client.last_error \
                or "Not authorized" in client.last_error
            assert client.connects == 0
            await good.stop()
            await bad.stop()

        asyncio.run(go())
