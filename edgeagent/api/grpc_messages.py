"""Triton's generated gRPC messages (``model_config_pb2``, ``service_pb2`` from
``tritonclient.grpc``), imported without the client around them.

``import tritonclient.grpc`` runs the package's ``__init__``, which brings Triton's whole client
(its numpy and dtype helpers, ``rapidjson``, ``ml_dtypes``, the plugin machinery): about 3 MB of
resident memory a server never uses (and grpcio, which the agent does not use: its gRPC is
:mod:`edgeagent.api.http2`). The two message modules need nothing of it, so they
are imported under a bare package object standing in for ``tritonclient.grpc`` and kept in
``sys.modules`` under their own names; the stand-in is removed at once, so a later ``import
tritonclient.grpc`` (an application embedding the agent, the test suite) runs the real
``__init__``, which finds the same modules already loaded (one descriptor pool, one set of
message classes). Where the real package is already imported it is simply used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

_PACKAGE = "tritonclient.grpc"
_MODULES = ("model_config_pb2", "service_pb2")


def _modules() -> tuple[Any, ...]:
    return tuple(importlib.import_module(f"{_PACKAGE}.{m}") for m in _MODULES)


def _import() -> tuple[Any, ...]:
    # Another thread importing tritonclient.grpc meanwhile would get the stand-in: hold the
    # interpreter's import lock (re-entrant for this thread) while it is in sys.modules.
    import _imp

    acquire = getattr(_imp, "acquire_lock", lambda: None)
    release = getattr(_imp, "release_lock", lambda: None)
    acquire()
    try:
        if _PACKAGE in sys.modules:  # the real package is loaded already: use it
            return _modules()
        spec = importlib.util.find_spec(_PACKAGE)  # imports `tritonclient` (empty) only
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(f"{_PACKAGE} is not installed (pip install 'tritonclient[grpc]')")
        bare = types.ModuleType(_PACKAGE)
        bare.__path__ = list(spec.submodule_search_locations)
        bare.__spec__ = spec
        sys.modules[_PACKAGE] = bare
        try:
            return _modules()
        finally:
            if sys.modules.get(_PACKAGE) is bare:
                del sys.modules[_PACKAGE]
    finally:
        release()


model_config_pb2, service_pb2 = _import()
