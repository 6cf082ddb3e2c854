"""Fixtures of the hub tests: a hub folder with keys, served over loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from edgeconvert.hub import Hub

from tests.hub.hubserver import HubServer


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    h = Hub(tmp_path / "hub", tmp_path / "keys")
    h.init()
    return h


@pytest.fixture
def server(hub: Hub) -> Iterator[HubServer]:
    srv = HubServer(hub.dir)
    yield srv
    srv.close()
