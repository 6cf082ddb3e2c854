"""The spool's bound, counting and restart behaviour; system figures from a fake tree."""

from __future__ import annotations

from pathlib import Path

from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.system import SystemSampler


def test_spool_bound_counts_what_it_drops_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_messages=3, max_bytes=1000)
    for _ in range(5):
        spool.add("t", lambda seq, st: f"{seq}:{st.dropped}".encode())
    assert [m.seq for m in spool.peek()] == [3, 4, 5]
    assert spool.stats().dropped == 2
    spool.remove([3])
    spool.close()
    again = Spool(path, max_messages=3, max_bytes=1000)
    assert [m.seq for m in again.peek()] == [4, 5]
    assert again.add("t", lambda seq, st: b"x") == 6
    again.close()


def test_spool_byte_bound_and_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_messages=100, max_bytes=25)
    for _ in range(4):
        spool.add("t", lambda seq, st: b"x" * 10)
    assert spool.stats().depth == 2 and spool.stats().dropped == 2
    spool.close()
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    fresh = Spool(bad, 10, 1000)
    assert fresh.stats().depth == 0 and (tmp_path / "bad.sqlite3.corrupt").exists()
    fresh.close()


def test_system_figures_from_a_fake_jetson_tree(tmp_path: Path) -> None:
    def put(rel: str, text: str) -> None:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    put("proc/stat", "cpu  100 0 100 800 0 0 0 0 0 0\n")
    put("proc/meminfo", "MemTotal: 8000000 kB\nMemAvailable: 2000000 kB\n")
    put("proc/loadavg", "0.50 0.40 0.30 1/100 42\n")
    put("sys/class/thermal/thermal_zone0/type", "CPU-therm\n")
    put("sys/class/thermal/thermal_zone0/temp", "45500\n")
    put("sys/devices/platform/gpu.0/load", "375\n")
    hw = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    put(f"{hw}/in1_label", "VDD_IN\n")
    put(f"{hw}/in1_input", "5000\n")
    put(f"{hw}/curr1_input", "1200\n")
    sampler = SystemSampler(tmp_path, disk_path=tmp_path, nvml=False)
    first = sampler.sample()
    assert "cpu_percent" not in first  # needs two samples
    put("proc/stat", "cpu  200 0 200 900 0 0 0 0 0 0\n")
    s = sampler.sample()
    assert s["cpu_percent"] == 66.7
    assert s["memory"]["used_percent"] == 75.0
    assert s["load"] == [0.5, 0.4, 0.3]
    assert s["temperatures_c"] == {"CPU-therm": 45.5}
    assert s["gpu_load_percent"] == 37.5
    assert s["power"] == {"VDD_IN": {"mv": 5000, "ma": 1200, "mw": 6000.0}}
    assert "disk" in s and "gpus" not in s
