"""The hub, repository side: ``edgeconvert hub init|refresh|list``.

The signing core is :mod:`edgeagent.hub.repository` (the agent makes its local demo hub with
it); this module is the command line over it and turns its errors into edgeconvert's.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeagent.hub.repository import HubRepository, RepositoryError

from .errors import InputError

#: The repository side of a hub folder and its keys (see :mod:`edgeagent.hub.repository`).
Hub = HubRepository


@contextmanager
def input_errors() -> Iterator[None]:
    """Report the repository's refusals as edgeconvert's bad-input errors (exit status 2)."""
    try:
        yield
    except RepositoryError as exc:
        raise InputError(str(exc)) from exc


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
    with input_errors():
        root = Hub(args.hub_dir, args.keys).init()
    print(f"hub made in {args.hub_dir}; keys in {args.keys} (keep them private)")
    print(f"root metadata to provision on boxes (hub.root): {root}")
    return 0


def _refresh(args: argparse.Namespace) -> int:
    with input_errors():
        Hub(args.hub_dir, args.keys).refresh()
    print(f"{args.hub_dir}: snapshot and timestamp re-signed")
    return 0


def _list(args: argparse.Namespace) -> int:
    with input_errors():
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

