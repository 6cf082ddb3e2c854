"""The hub, repository side: make a hub, sign releases into it, re-sign its metadata.

``edgeconvert hub|publish`` drive this; the agent uses it too, for the local demo hub it makes
on embedded defaults (so the signing code lives in the agent's package: ``edgeconvert``
imports the agent, never the reverse).

A hub is a static tree any web server can serve::

    HUB/metadata/N.root.json, root.json     root metadata (every version, and the latest)
    HUB/metadata/N.targets.json             targets: every file of every release
    HUB/metadata/N.snapshot.json            snapshot: the current targets version
    HUB/metadata/timestamp.json             timestamp: the current snapshot (short-lived)
    HUB/targets/models/NAME/VERSION/SHA.FILE  release files, prefixed by their SHA-256

Consistent snapshots (versioned metadata, hash-prefixed targets) mean a client never mixes
files of two publications, even while one is being uploaded. Keys (ed25519, one per role) live
in a separate KEYS folder, never under HUB. Every file is written atomically, the timestamp
last: until it changes, clients see the previous hub.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from edgeagent.errors import HubError, VerificationError
from edgeagent.fsutil import write_atomic
from edgeagent.hub.bundle import SCHEMA, parse_bundle


class RepositoryError(HubError):
    """Bad input to the repository side: no hub there, missing keys, a version not newer."""

    exit_code = 2


ROLES = ("root", "targets", "snapshot", "timestamp")
#: How long each role's signature lasts; ``hub refresh`` renews snapshot and timestamp.
EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=365),
          "snapshot": timedelta(days=30), "timestamp": timedelta(days=7)}


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    write_atomic(path, data, mode)


def _expires(role: str, expiry: Mapping[str, timedelta] | None) -> datetime:
    delta = (expiry or {}).get(role, EXPIRY[role])
    return (datetime.now(timezone.utc) + delta).replace(microsecond=0)


class HubRepository:
    """A hub folder and its keys.

    Args:
        hub_dir: The hub tree.
        keys_dir: The signing keys (``ROLE.pem``).
        expiry: Validity per role, overriding :data:`EXPIRY`.
    """

    def __init__(self, hub_dir: Path, keys_dir: Path,
                 expiry: Mapping[str, timedelta] | None = None) -> None:
        self.dir = hub_dir
        self.keys_dir = keys_dir
        self.meta_dir = hub_dir / "metadata"
        self.expiry = dict(expiry or {})

    # ---- keys ---------------------------------------------------------------------------

    def _signer(self, role: str) -> CryptoSigner:
        path = self.keys_dir / f"{role}.pem"
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise RepositoryError(f"{path}: no {role} key (is --keys the folder 'hub init' made?)"
                             ) from None
        except ValueError as exc:
            raise RepositoryError(f"{path}: not a private key ({exc})") from exc
        return CryptoSigner(key)

    # ---- init ---------------------------------------------------------------------------

    def init(self) -> Path:
        """Make a new hub and its keys; return the root metadata to provision on boxes.

        Raises:
            RepositoryError: the hub or key folder already holds a hub, or the keys would go under
                the hub (where anyone fetching from it could read them).
        """
        hub, keys = self.dir.resolve(), self.keys_dir.resolve()
        if keys == hub or hub in keys.parents:
            raise RepositoryError(f"{self.keys_dir}: keys must not live under the hub folder "
                             "(the hub is served to the world)")
        if (self.meta_dir / "1.root.json").exists():
            raise RepositoryError(f"{self.dir} already holds a hub")
        if any((self.keys_dir / f"{r}.pem").exists() for r in ROLES):
            raise RepositoryError(f"{self.keys_dir} already holds hub keys; use another folder")
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
        signers = {}
        for role in ROLES:
            signer = CryptoSigner.generate_ed25519()
            _write(self.keys_dir / f"{role}.pem", signer.private_bytes, 0o600)
            signers[role] = signer
        root = Metadata(Root(expires=_expires("root", self.expiry), consistent_snapshot=True))
        for role, signer in signers.items():
            root.signed.add_key(signer.public_key, role)
        root.sign(signers["root"])
        targets = Metadata(Targets(expires=_expires("targets", self.expiry)))
        snapshot = Metadata(Snapshot(expires=_expires("snapshot", self.expiry)))
        timestamp = Metadata(Timestamp(expires=_expires("timestamp", self.expiry)))
        for md, role in ((targets, "targets"), (snapshot, "snapshot"), (timestamp, "timestamp")):
            md.sign(signers[role])
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "targets").mkdir(exist_ok=True)
        data = root.to_bytes(_serializer())
        _write(self.meta_dir / "1.root.json", data)
        _write(self.meta_dir / "root.json", data)
        self._commit(targets.to_bytes(_serializer()), targets.signed.version, snapshot, timestamp,
                     bump=False)
        return self.meta_dir / "1.root.json"

    # ---- reading ------------------------------------------------------------------------

    def _current(self) -> tuple[Metadata[Targets], Metadata[Snapshot], Metadata[Timestamp]]:
        try:
            timestamp = Metadata[Timestamp].from_file(str(self.meta_dir / "timestamp.json"))
            snap_version = timestamp.signed.snapshot_meta.version
            snapshot = Metadata[Snapshot].from_file(
                str(self.meta_dir / f"{snap_version}.snapshot.json"))
            tv = snapshot.signed.meta["targets.json"].version
            targets = Metadata[Targets].from_file(str(self.meta_dir / f"{tv}.targets.json"))
        except FileNotFoundError as exc:
            raise RepositoryError(f"{self.dir}: not a hub ({exc.filename} is missing; "
                             "make one with 'edgeconvert hub init')") from exc
        return targets, snapshot, timestamp

    def releases(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Every release the hub signs: name -> version -> bundle.json."""
        targets, _, _ = self._current()
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for path, info in targets.signed.targets.items():
            parts = path.split("/")
            if len(parts) == 4 and parts[0] == "models" and parts[3] == "bundle.json":
                stored = self.dir / "targets" / "models" / parts[1] / parts[2] / \
                    f"{info.hashes['sha256']}.bundle.json"
                out.setdefault(parts[1], {})[int(parts[2])] = json.loads(stored.read_bytes())
        return out

    # ---- writing ------------------------------------------------------------------------

    def add_release(self, name: str, version: int, files: Mapping[str, bytes],
                    bundle: Mapping[str, Any]) -> None:
        """Add the files and bundle.json of a release, sign, and publish (timestamp last).

        Raises:
            RepositoryError: the version is not newer than the hub's latest for this model.
        """
        targets, snapshot, timestamp = self._current()
        latest = max(self.releases().get(name, {}), default=0)
        if version <= latest:
            raise RepositoryError(f"{name} version {version} is not newer than the hub's latest "
                             f"({latest}); publish version {latest + 1} or later")
        folder = self.dir / "targets" / "models" / name / str(version)
        payloads = dict(files)
        payloads["bundle.json"] = json.dumps(bundle, indent=2, sort_keys=True).encode()
        for fname, data in payloads.items():
            digest = hashlib.sha256(data).hexdigest()
            _write(folder / f"{digest}.{fname}", data)
            target = TargetFile.from_data(f"models/{name}/{version}/{fname}", data, ["sha256"])
            targets.signed.targets[target.path] = target
        targets.signed.version += 1
        targets.signed.expires = _expires("targets", self.expiry)
        targets.signatures.clear()
        targets.sign(self._signer("targets"))
        self._commit(targets.to_bytes(_serializer()), targets.signed.version, snapshot,
                     timestamp)

    def refresh(self) -> None:
        """Re-sign snapshot and timestamp with fresh expiry dates."""
        targets, snapshot, timestamp = self._current()
        self._commit(None, targets.signed.version, snapshot, timestamp)

    def _commit(self, targets_bytes: bytes | None, targets_version: int,
                snapshot: Metadata[Snapshot], timestamp: Metadata[Timestamp],
                bump: bool = True) -> None:
        if targets_bytes is not None:
            _write(self.meta_dir / f"{targets_version}.targets.json", targets_bytes)
        s, t = snapshot.signed, timestamp.signed
        if bump:  # a fresh hub starts at version 1
            s.version += 1
            t.version += 1
        s.meta["targets.json"] = MetaFile(targets_version)
        s.expires = _expires("snapshot", self.expiry)
        snapshot.signatures.clear()
        snapshot.sign(self._signer("snapshot"))
        _write(self.meta_dir / f"{s.version}.snapshot.json", snapshot.to_bytes(_serializer()))
        t.snapshot_meta = MetaFile(s.version)
        t.expires = _expires("timestamp", self.expiry)
        timestamp.signatures.clear()
        timestamp.sign(self._signer("timestamp"))
        _write(self.meta_dir / "timestamp.json", timestamp.to_bytes(_serializer()))


def file_ref(file: str, data: bytes) -> dict[str, Any]:
    """A bundle's entry for one file of the release: plain name, size, SHA-256."""
    return {"file": file, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def release_bundle(name: str, version: int, *, inputs: Sequence[Mapping[str, Any]],
                   outputs: Sequence[Mapping[str, Any]], variants: Sequence[Mapping[str, Any]],
                   checks: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``bundle.json`` of a release, checked as a box will read it.

    Args:
        name: The model name.
        version: The release's version (1 or more).
        inputs: The input signature: ``{"name", "dtype", "shape"}`` per tensor.
        outputs: The output signature: ``{"name"}`` per tensor.
        variants: :func:`file_ref` entries with ``format``, ``precision`` and ``needs``.
        checks: A :func:`file_ref` entry of the checks ``.npz`` with ``atol`` and ``rtol``.

    Raises:
        RepositoryError: naming the field a box would refuse.
    """
    bundle: dict[str, Any] = {"schema": SCHEMA, "name": name, "version": version,
                              "inputs": [dict(i) for i in inputs],
                              "outputs": [dict(o) for o in outputs],
                              "variants": [dict(v) for v in variants],
                              "checks": dict(checks) if checks is not None else None}
    try:
        parse_bundle(bundle, name, version)
    except VerificationError as exc:
        raise RepositoryError(str(exc)) from exc
    return bundle


def _serializer() -> JSONSerializer:
    return JSONSerializer(compact=False)


