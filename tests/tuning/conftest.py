"""The hub fixtures (a real hub served over loopback) for the tuning tests."""

from tests.hub.conftest import hub, server

__all__ = ["hub", "server"]
