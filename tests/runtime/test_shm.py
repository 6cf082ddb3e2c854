"""The shared memory registry's bounds, on objects made in a temporary folder (the registry
takes its root, as ``/dev/shm`` is for the real agent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgeagent.runtime.shm import (
    RegionExists,
    RegionForbidden,
    RegionNotFound,
    SharedMemoryError,
    SharedMemoryRegistry,
    ShmRef,
)


def _object(root: Path, name: str, size: int) -> Path:
    path = root / name
    path.write_bytes((bytes(range(256)) * (size // 256 + 1))[:size])
    return path


def test_a_region_unregistered_while_in_use_stays_mapped_until_released(tmp_path: Path) -> None:
    _object(tmp_path, "obj", 512)
    reg = SharedMemoryRegistry(root=tmp_path)
    reg.register("r", "/obj", 256, 256)
    with reg.lease({"r"}) as held:
        reg.unregister("r")  # taken out at once ...
        with pytest.raises(RegionNotFound), reg.lease({"r"}):
            pass
        view = held["r"].view(ShmRef("r", 4, 0), "input 'x'")  # ... but still readable
        assert bytes(view) == bytes(range(4))
        del view
    assert reg.status() == []


def test_writes_stay_inside_the_reference(tmp_path: Path) -> None:
    path = _object(tmp_path, "obj", 64)
    reg = SharedMemoryRegistry(root=tmp_path)
    reg.register("r", "obj", 16, 32)
    with reg.lease({"r"}) as held:
        held["r"].write(ShmRef("r", 8, 4), np.array([1, 2], np.int32), "output 'y'")
        with pytest.raises(SharedMemoryError, match="more than the 4 bytes given"):
            held["r"].write(ShmRef("r", 4, 0), np.array([1, 2], np.int32), "output 'y'")
        with pytest.raises(SharedMemoryError, match="past the end of shared memory region"):
            held["r"].write(ShmRef("r", 8, 28), np.array([1, 2], np.int32), "output 'y'")
    data = path.read_bytes()
    assert data[20:28] == np.array([1, 2], np.int32).tobytes()
    assert data[:20] == bytes(range(20))  # nothing else touched
    reg.close()


@pytest.mark.parametrize(("name", "key", "words"), [
    ("", "/obj", "1 to 255 printable"), ("a\nb", "/obj", "printable"),
    ("r", "/", "one name"), ("r", "/..", "one name"), ("r", "/x/../obj", "one name"),
    ("r", "/nul\0", "one name"), ("r", "/" + "k" * 300, "one name"),
])
def test_names_and_keys_are_checked(tmp_path: Path, name: str, key: str, words: str) -> None:
    _object(tmp_path, "obj", 64)
    with pytest.raises(SharedMemoryError, match=words):
        SharedMemoryRegistry(root=tmp_path).register(name, key, 0, 16)


def test_links_folders_and_sizes_are_refused(tmp_path: Path) -> None:
    _object(tmp_path, "obj", 64)
    (tmp_path / "link").symlink_to(tmp_path / "obj")
    (tmp_path / "folder").mkdir()
    reg = SharedMemoryRegistry(root=tmp_path, max_regions=2)
    with pytest.raises(SharedMemoryError, match="cannot open"):
        reg.register("r", "/link", 0, 16)  # O_NOFOLLOW: never through a link
    with pytest.raises(SharedMemoryError, match=r"cannot open|not a shared memory object"):
        reg.register("r", "/folder", 0, 16)
    with pytest.raises(SharedMemoryError, match="byte_size > 0"):
        reg.register("r", "/obj", 0, 0)
    with pytest.raises(SharedMemoryError, match="offset must be >= 0"):
        reg.register("r", "/obj", -1, 16)
    reg.register("a", "/obj", 0, 16)
    with pytest.raises(RegionExists):
        reg.register("a", "/obj", 0, 16)
    reg.register("b", "/obj", 16, 16)
    with pytest.raises(SharedMemoryError, match="2 shared memory regions are registered"):
        reg.register("c", "/obj", 0, 16)
    reg.close()
    assert reg.status() == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any file: no permission "
                    "error to see")
def test_an_object_the_agent_may_not_open_is_refused(tmp_path: Path) -> None:
    path = _object(tmp_path, "obj", 64)
    path.chmod(0o400)
    with pytest.raises(RegionForbidden, match="file permissions"):
        SharedMemoryRegistry(root=tmp_path).register("r", "/obj", 0, 16)
