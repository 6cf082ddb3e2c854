"""The hub, repository side: ``edgeconvert hub init|refresh|list``.

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

import argparse
import json
import os
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .errors import InputError

ROLES = ("root", "targets", "snapshot", "timestamp")
#: How long each role's signature lasts; ``hub refresh`` renews snapshot and timestamp.
EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=365),
          "snapshot": timedelta(days=30), "timestamp": timedelta(days=7)}


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _expires(role: str, expiry: Mapping[str, timedelta] | None) -> datetime:
    delta = (expiry or {}).get(role, EXPIRY[role])
    return (datetime.now(timezone.utc) + delta).replace(microsecond=0)


class Hub:
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

    def _signer(self, role: str) -> Any:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from securesystemslib.signer import CryptoSigner

        path = self.keys_dir / f"{role}.pem"
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise InputError(f"{path}: no {role} key (is --keys the folder 'hub init' made?)"
                             ) from None
        except ValueError as exc:
            raise InputError(f"{path}: not a private key ({exc})") from exc
        return CryptoSigner(key)

    # ---- init ---------------------------------------------------------------------------

    def init(self) -> Path:
        """Make a new hub and its keys; return the root metadata to provision on boxes.

        Raises:
            InputError: the hub or key folder already holds a hub, or the keys would go under
                the hub (where anyone fetching from it could read them).
        """
        from securesystemslib.signer import CryptoSigner
        from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

        hub, keys = self.dir.resolve(), self.keys_dir.resolve()
        if keys == hub or hub in keys.parents:
            raise InputError(f"{self.keys_dir}: keys must not live under the hub folder "
                             "(the hub is served to the world)")
        if (self.meta_dir / "1.root.json").exists():
            raise InputError(f"{self.dir} already holds a hub")
        if any((self.keys_dir / f"{r}.pem").exists() for r in ROLES):
            raise InputError(f"{self.keys_dir} already holds hub keys; use another folder")
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

    def _current(self) -> tuple[Any, Any, Any]:
        from tuf.api.metadata import Metadata

        try:
            timestamp = Metadata.from_file(str(self.meta_dir / "timestamp.json"))
            snap_version = timestamp.signed.snapshot_meta.version
            snapshot = Metadata.from_file(str(self.meta_dir / f"{snap_version}.snapshot.json"))
            tv = snapshot.signed.meta["targets.json"].version
            targets = Metadata.from_file(str(self.meta_dir / f"{tv}.targets.json"))
        except FileNotFoundError as exc:
            raise InputError(f"{self.dir}: not a hub ({exc.filename} is missing; "
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

    def add_release(self, name: str, version: int, files: Mapping[str, Path],
                    bundle: Mapping[str, Any]) -> None:
        """Add the files and bundle.json of a release, sign, and publish (timestamp last).

        Raises:
            InputError: the version is not newer than the hub's latest for this model.
        """
        import hashlib

        from tuf.api.metadata import TargetFile

        targets, snapshot, timestamp = self._current()
        latest = max(self.releases().get(name, {}), default=0)
        if version <= latest:
            raise InputError(f"{name} version {version} is not newer than the hub's latest "
                             f"({latest}); publish version {latest + 1} or later")
        folder = self.dir / "targets" / "models" / name / str(version)
        payloads = {fname: path.read_bytes() for fname, path in files.items()}
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

    def _commit(self, targets_bytes: bytes | None, targets_version: int, snapshot: Any,
                timestamp: Any, bump: bool = True) -> None:
        from tuf.api.metadata import MetaFile

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


def _serializer() -> Any:
    from tuf.api.serialization.json import JSONSerializer

    return JSONSerializer(compact=False)


# ---- command line -------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hub init|refresh|list``."""
    parser = commands.add_parser("hub", help="make and maintain a model hub (TUF-signed)",
                                 description="Make and maintain a model hub (TUF-signed).")
    sub = parser.add_subparsers(dest="hub_command", metavar="ACTION", required=True)
    p = sub.add_parser("init", help="make a new hub and its signing keys")
    p.add_argument("hub_dir", type=Path, metavar="HUB_DIR")
    p.add_argument("--keys", type=Path, required=True, metavar="KEYS_DIR",
                   help="where the signing keys go (never under HUB_DIR)")
    p.set_defaults(handler=_init)
    p = sub.add_parser("refresh", help="re-sign the short-lived metadata (snapshot, timestamp)")
    p.add_argument("hub_dir", type=Path, metavar="HUB_DIR")
    p.add_argument("--keys", type=Path, required=True, metavar="KEYS_DIR")
    p.set_defaults(handler=_refresh)
    p = sub.add_parser("list", help="models, versions and variants on a hub")
    p.add_argument("hub_dir", type=Path, metavar="HUB_DIR")
    p.set_defaults(handler=_list)


def _init(args: argparse.Namespace) -> int:
    root = Hub(args.hub_dir, args.keys).init()
    print(f"hub made in {args.hub_dir}; keys in {args.keys} (keep them private)")
    print(f"root metadata to provision on boxes (hub.root): {root}")
    return 0


def _refresh(args: argparse.Namespace) -> int:
    Hub(args.hub_dir, args.keys).refresh()
    print(f"{args.hub_dir}: snapshot and timestamp re-signed")
    return 0


def _list(args: argparse.Namespace) -> int:
    releases = Hub(args.hub_dir, Path()).releases()
    if not releases:
        print(f"{args.hub_dir}: no models yet")
    for name in sorted(releases):
        for version in sorted(releases[name]):
            bundle = releases[name][version]
            variants = ", ".join(f"{v['file']} ({v['format']}/{v['precision']}, {v['size']} B)"
                                 for v in bundle["variants"])
            checks = " +checks" if bundle.get("checks") else ""
            print(f"{name} v{version}: {variants}{checks}")
    return 0

