"""The fleet controller under simulated fleets, from one command.

    python -m benchmarks.fleet --devices 1000
    python -m benchmarks.fleet --devices 10000 --out fleet-10k.json

What it does, all on loopback: starts a stock Mosquitto on a free port (a config of only a
listener, ``allow_anonymous true`` and ``max_connections -1``; the file limit raised with
``setrlimit``), starts ``edgeagent fleet serve`` as a subprocess with SQLite in a temporary
directory, connects the simulated devices of ``benchmarks/fleetsim.py`` in this process, then:

1. inventory: seconds from the last device connected until every device's ``reported`` is in
   the controller's database;
2. ``fleet status``: the API's answer time (median of 20) and the CLI's wall time (one process,
   Python start-up included);
3. 5 % of the devices drop off the network (their last will says offline); a rollout of v2 in
   waves 1 %, 10 %, 50 %, 100 %: seconds per wave and in total, publishes per wave, the counts;
4. 20 % of the devices fail v3: a rollout of v3 in the same waves (at least 20 devices in
   wave 1) must stop in wave 1 and
   every device that ran v3 must be back on v2;
5. CPU: the controller's (psutil, its process) per device message ingested, and the
   simulator's (this process) over the whole run;
6. a controller restart: how long the paced catch-up of every known device's retained state
   takes.

The box is shared (2 cores, other jobs): figures are what one run saw, and the simulator's CPU
competes with the controller's and the broker's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.fleetsim import FleetSim
from edgeagent.control.rollout import bucket

ROOT = Path(__file__).resolve().parents[1]
WAVES = "1%,10%,50%,100%"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait(predicate: Any, timeout: float, what: str, every: float = 0.1) -> float:
    note(f"waiting for {what}")
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise SystemExit(f"benchmark: timed out waiting for {what}")
        time.sleep(every)
    return time.time()


class Rig:
    def __init__(self, work: Path, n: int) -> None:
        self.work = work
        self.n = n
        self.broker_port = free_port()
        self.api_port = free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {self.broker_port} 127.0.0.1\nallow_anonymous true\n"
                        "max_connections -1\n")
        # Children inherit the file limit main() raised.
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.broker = subprocess.Popen([mosquitto, "-c", str(conf)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fleet = work / "fleet.toml"
        fleet.write_text(
            f'[broker]\nurl = "mqtt://127.0.0.1:{self.broker_port}"\n'
            f'[database]\nstate_dir = "{work}"\n[api]\nlisten = "127.0.0.1:{self.api_port}"\n'
            '[rollouts]\ntick_s = 0.5\nmin_devices = 20\nwave_timeout_s = 300\n'
            'max_failures = "5%"\n')
        self.fleet_conf = fleet
        time.sleep(0.5)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=60)
        self.start_controller()
        self.http.headers["Authorization"] = f"Bearer {(work / 'api-token').read_text().strip()}"

    def start_controller(self) -> None:
        self.controller = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "fleet", "serve", "--config",
             str(self.fleet_conf)], cwd=ROOT,
            stdout=(self.work / "controller.log").open("ab"), stderr=subprocess.STDOUT)
        self.proc = psutil.Process(self.controller.pid)
        wait(self._healthy, 60, "the controller")

    def restart_controller(self) -> None:
        self.controller.send_signal(signal.SIGTERM)
        self.controller.wait(60)
        self.start_controller()

    def _healthy(self) -> bool:
        try:
            return bool(self.http.get("/v1/fleet/health").json()["broker_connected"])
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> Any:
        r = self.http.get(path)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        r = self.http.post(path, json=body)
        if r.status_code >= 400:
            raise SystemExit(f"benchmark: {path}: {r.text}")
        return r.json()

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def close(self) -> None:
        for p in (self.controller, self.broker):
            p.send_signal(signal.SIGTERM)
        for p in (self.controller, self.broker):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def reported_count(status: dict[str, Any]) -> int:
    return sum(status["inventory"]["models"].get("mlp", {}).get("versions", {}).values())


def run_rollout(rig: Rig, version: int, sim_loop: asyncio.AbstractEventLoop,
                sim: FleetSim) -> dict[str, Any]:
    r = rig.post("/v1/fleet/rollouts", {"model": "mlp", "version": version, "fleet": True,
                                        "waves": WAVES})
    rid = r["rollout_id"]
    t0 = time.time()
    sent0 = sim.published
    wave_times: dict[int, float] = {}
    while True:
        d = rig.get(f"/v1/fleet/rollouts/{rid}")
        for w in d["waves"]:
            if w["finished"] and w["wave"] not in wave_times:
                wave_times[w["wave"]] = w["finished"] - w["started"]
        if d["phase"] in ("done", "aborted") and d["document"]["published"]:
            break
        if time.time() - t0 > 900:
            raise SystemExit(f"benchmark: rollout {rid} did not finish: {d['summary']}")
        time.sleep(1.0)
    total = (d["finished"] or time.time()) - d["created"]
    ran = [dev for dev in sim.devices if ("mlp", version) in dev.history]
    first_share = d["waves"][0]["share"] * 100
    return {"rollout_id": rid, "phase": d["phase"], "summary": d["summary"],
            "seconds": round(total, 2), "waves": [
                {"wave": w["wave"], "percent": w["percent"], "share": w["share"],
                 "seconds": round(wave_times.get(w["wave"], 0.0), 2), "result": w["result"],
                 "counts": {k: v for k, v in w["counts"].items() if v}} for w in d["waves"]],
            "counts": d["counts"], "publishes": d["publishes"],
            "device_messages": sim.published - sent0,
            "ran_version": len(ran),
            "ran_outside_wave_1": sum(1 for dev in ran
                                      if bucket(rid, dev.device_id) >= first_share),
            "still_on_version": sum(1 for dev in sim.devices
                                    if dev.running.get("mlp") == version)}


def main() -> None:  # noqa: PLR0915 - the benchmark's script, phase after phase
    ap = argparse.ArgumentParser(description="fleet controller benchmark")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--activation-s", type=float, default=1.0,
                    help="mean seconds a simulated device takes to activate a version")
    ap.add_argument("--offline", type=float, default=0.05)
    ap.add_argument("--failing", type=float, default=0.20)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    raise_nofile()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    out: dict[str, Any] = {"devices": args.devices, "activation_s": args.activation_s,
                           "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        rig = Rig(Path(tmp), args.devices)
        loop = asyncio.new_event_loop()
        import threading

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()

        def on_loop(coro: Any, timeout: float = 900) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

        async def make() -> FleetSim:
            return FleetSim(f"mqtt://127.0.0.1:{rig.broker_port}", args.devices,
                            activation_s=args.activation_s, failing=args.failing,
                            fail_versions={3}, reported_interval_s=300.0)

        me = psutil.Process()
        sim_cpu0 = sum(me.cpu_times()[:2])
        try:
            sim = on_loop(make())
            cpu0 = rig.cpu()
            t_start = time.time()
            t_last = on_loop(sim.start())
            out["connect_s"] = round(t_last - t_start, 2)
            t_done = wait(lambda: reported_count(rig.get("/v1/fleet/status")) >= args.devices,
                          600, "the inventory", 0.25)
            status = rig.get("/v1/fleet/status")
            ingested = status["ingest"]["processed"]
            cpu_inv = rig.cpu() - cpu0
            ingest_cpu = status["ingest"]["cpu_s"]
            out["inventory"] = {"complete_after_last_connect_s": round(t_done - t_last, 2),
                                "messages": ingested,
                                "controller_cpu_s": round(cpu_inv, 2),
                                "controller_cpu_us_per_message": round(
                                    cpu_inv / max(1, ingested) * 1e6, 1),
                                "ingest_thread_cpu_us_per_message": round(
                                    ingest_cpu / max(1, ingested) * 1e6, 1),
                                "dropped": status["ingest"]["dropped"]}
            lat = []
            for _ in range(20):
                t0 = time.perf_counter()
                rig.get("/v1/fleet/status")
                lat.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "edgeagent", "fleet", "status",
                                   "--config", str(rig.fleet_conf)], cwd=ROOT,
                                  capture_output=True, text=True, check=False)
            out["status"] = {"api_median_s": round(statistics.median(lat), 4),
                             "api_max_s": round(max(lat), 4),
                             "cli_wall_s": round(time.perf_counter() - t0, 3),
                             "cli_exit": proc.returncode}
            pages_t0 = time.perf_counter()
            after, listed = "", 0
            while True:
                page = rig.get(f"/v1/fleet/devices?limit=1000&after={after}")
                listed += len(page["devices"])
                if not page["next"]:
                    break
                after = page["next"]
            out["devices_listing_s"] = round(time.perf_counter() - pages_t0, 3)
            assert listed == args.devices, listed
            # 5 % drop off the network before the rollouts.
            n_off = int(args.devices * args.offline)
            gone = [d.device_id for d in sim.devices[-n_off:]] if n_off else []
            loop.call_soon_threadsafe(sim.drop, gone)
            wait(lambda: rig.get("/v1/fleet/status")["inventory"]["by_state"].get(
                "offline", 0) >= n_off, 120, "the dropped devices' last wills")
            st1 = rig.get("/v1/fleet/status")["ingest"]
            cpu1, msgs1, icpu1 = rig.cpu(), st1["processed"], st1["cpu_s"]
            out["rollout_good"] = run_rollout(rig, 2, loop, sim)
            out["rollout_failing"] = run_rollout(rig, 3, loop, sim)
            status = rig.get("/v1/fleet/status")
            msgs = status["ingest"]["processed"] - msgs1
            cpu_r = rig.cpu() - cpu1
            out["rollouts_controller"] = {
                "messages": msgs, "controller_cpu_s": round(cpu_r, 2),
                "controller_cpu_us_per_message": round(cpu_r / max(1, msgs) * 1e6, 1),
                "ingest_thread_cpu_us_per_message": round(
                    (status["ingest"]["cpu_s"] - icpu1) / max(1, msgs) * 1e6, 1),
                "dropped": status["ingest"]["dropped"]}
            # A restart: the database keeps the inventory; the paced catch-up asks for the
            # retained state of every known device, catchup_batch at a time.
            t0 = time.time()
            rig.restart_controller()
            wait(lambda: rig.get("/v1/fleet/status")["catchup"]["state"] == "done", 600,
                 "the catch-up after a restart", 0.25)
            cu = rig.get("/v1/fleet/status")
            out["restart"] = {
                "catchup_s": round(cu["catchup"]["finished"] - cu["catchup"]["started"], 2),
                "devices": cu["catchup"]["devices"], "batches_ok": cu["catchup"]["batches_ok"],
                "restart_to_caught_up_s": round(time.time() - t0, 2),
                "messages": cu["ingest"]["processed"], "dropped": cu["ingest"]["dropped"],
                "inventory_devices": cu["inventory"]["devices"]}
            show = []
            for _ in range(5):
                t0 = time.perf_counter()
                rig.get(f"/v1/fleet/rollouts/{out['rollout_good']['rollout_id']}")
                show.append(time.perf_counter() - t0)
            # What one tick of the leader costs at this size: the same recount.
            out["rollout_show_median_s"] = round(statistics.median(show), 4)
            out["controller_rss_mb"] = round(rig.proc.memory_info().rss / 2**20, 1)
            out["simulator_cpu_s"] = round(sum(me.cpu_times()[:2]) - sim_cpu0, 2)
            out["simulator_rss_mb"] = round(me.memory_info().rss / 2**20, 1)
            out["database_mb"] = round(sum(f.stat().st_size for f in Path(tmp).glob(
                "fleet.db*")) / 2**20, 1)
            on_loop(sim.stop())
        finally:
            rig.close()
            loop.call_soon_threadsafe(loop.stop)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
