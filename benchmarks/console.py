"""The fleet console's page loads at 10,000 devices: server time and browser time.

    python -m benchmarks.console                     # 10,000 devices, 10 loads per page
    python -m benchmarks.console --devices 50000 --loads 5 --out console.json

What it does, all on loopback: a stock Mosquitto and ``edgeagent fleet serve`` (SQLite in a
temporary directory, as ``benchmarks/fleet.py`` starts them), then ``--devices`` inventory rows
written through the store's own ingest path (``Store.apply``: tags, profile, one model with a
version and, for 1 in 97, an error), as the controller's ingest writes them. Simulating that many
MQTT devices would measure the simulator on this box, not the console.

- **server**: the API calls each page makes, answered by the controller (median and p90 of 20,
  one keep-alive connection): the overview's ``GET /v1/fleet/status``; the device list's
  ``GET /v1/fleet/devices?limit=50&total=1`` unfiltered, on a deep page, and with each filter;
- **browser**: Debian's chromium (Playwright, headless), signed in once: from ``page.goto``
  until the page's content is on screen (the overview's model table, the device list's 50 rows
  and its "1-50 of N"), median of ``--loads``; and the browser's own ``domContentLoaded``.

The box is shared (2 cores, other jobs): figures are what one run saw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeagent.fleet.store import Batch, open_store

CHROMIUM = "/usr/bin/chromium"


def fill_inventory(db: str, n: int) -> None:
    """n devices ``dev-00000``... written through the store's ingest path: groups g0..g3
    (i % 4), profile jetson for i % 3 == 0 else cpu, offline for i % 10 == 0, mlp v1 or v2
    (odd i), and the error "mlp: session failed: out of memory" for i % 97 == 0."""
    store = open_store(db)
    now = time.time()
    width = max(5, len(str(n - 1)))
    try:
        for start in range(0, n, 1000):
            batch = Batch()
            for i in range(start, min(n, start + 1000)):
                u = batch.device(f"dev-{i:0{width}d}")
                u.seen = now
                u.status = {"state": "online" if i % 10 else "offline", "ts": now,
                            "version": "1"}
                err = "session failed: out of memory" if i % 97 == 0 else None
                u.reported = {"ts": now, "tags": [f"g{i % 4}"],
                              "profile": {"name": "jetson" if i % 3 == 0 else "cpu"},
                              "models": {"mlp": {"version": 1 + i % 2, "state": "ready",
                                                 "source": "config", "source_kind": "config",
                                                 "last_error": err}}}
            store.apply(batch)
    finally:
        store.close()


def _ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median_ms": round(statistics.median(s) * 1000, 2),
            "p90_ms": round(s[min(len(s) - 1, int(len(s) * 0.9))] * 1000, 2)}


def server_times(rig: Any, n: int) -> dict[str, dict[str, float]]:
    deep = f"dev-{n - 100:0{max(5, len(str(n - 1)))}d}"
    calls = {
        "overview: /v1/fleet/status": "/v1/fleet/status",
        "devices: first page": "/v1/fleet/devices?limit=50&total=1",
        "devices: a deep page": f"/v1/fleet/devices?limit=50&total=1&after={deep}",
        "devices: profile+group+state": "/v1/fleet/devices?limit=50&total=1&profile=jetson"
                                        "&group=g0&state=online",
        "devices: model+version": "/v1/fleet/devices?limit=50&total=1&model=mlp&version=2",
        "devices: error text": "/v1/fleet/devices?limit=50&total=1&error=out%20of%20memory",
    }
    out = {}
    for name, path in calls.items():
        rig.get(path)  # warm
        samples = []
        for _ in range(20):
            t0 = time.perf_counter()
            rig.get(path)
            samples.append(time.perf_counter() - t0)
        out[name] = _ms(samples)
    return out


def browser_times(rig: Any, token: str, loads: int, n: int) -> dict[str, dict[str, float]]:
    from playwright.sync_api import sync_playwright

    base = str(rig.http.base_url).rstrip("/")
    pages = {
        "overview": ("#/", "#card-models tr[data-model=mlp]"),
        "devices": ("#/devices", "#devices tbody tr:nth-child(50)"),
        "devices filtered": ("#/devices?profile=jetson&group=g0&state=online",
                             "#devices tbody tr:nth-child(50)"),
    }
    out: dict[str, dict[str, float]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})
            page = ctx.new_page()
            page.goto(f"{base}/console/login")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_selector("#card-devices")
            for name, (hash_, ready) in pages.items():
                wall, dcl = [], []
                for i in range(loads + 1):
                    page.goto("about:blank")
                    t0 = time.perf_counter()
                    page.goto(f"{base}/console/{hash_}")
                    page.wait_for_selector(ready, state="attached")
                    if i == 0:
                        continue  # the first load warms the browser's cache of the assets
                    wall.append(time.perf_counter() - t0)
                    nav = page.evaluate("() => performance.getEntriesByType('navigation')[0]"
                                        ".domContentLoadedEventEnd")
                    dcl.append(nav / 1000)
                if name.startswith("devices"):
                    text = page.inner_text("#range")
                    if not text.startswith("1-50 of "):
                        raise SystemExit(f"benchmark: the device list says {text!r}")
                out[name] = {**{f"until shown {k}": v for k, v in _ms(wall).items()},
                             "dom_content_loaded_ms": _ms(dcl)["median_ms"]}
        finally:
            browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from benchmarks.fleet import Rig, note, raise_nofile

    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="edgeagent-console-bench-") as tmp:
        work = Path(tmp)
        rig = Rig(work, args.devices)
        try:
            t0 = time.perf_counter()
            fill_inventory(str(work / "fleet.db"), args.devices)
            note(f"{args.devices} devices written in {time.perf_counter() - t0:.1f} s")
            total = rig.get("/v1/fleet/devices?limit=1&total=1")["total"]
            if total != args.devices:
                raise SystemExit(f"benchmark: the API counts {total} devices")
            token = (work / "api-token").read_text().strip()
            result = {"devices": args.devices, "loads": args.loads,
                      "server": server_times(rig, args.devices),
                      "browser": browser_times(rig, token, args.loads, args.devices)}
        finally:
            rig.close()
    print(f"{args.devices} devices")
    for name, v in result["server"].items():
        print(f"  server  {name:32} median {v['median_ms']:8.2f} ms   p90 {v['p90_ms']:8.2f} ms")
    for name, v in result["browser"].items():
        print(f"  browser {name:32} median {v['until shown median_ms']:8.2f} ms   p90 "
              f"{v['until shown p90_ms']:8.2f} ms   domContentLoaded "
              f"{v['dom_content_loaded_ms']:.1f} ms")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
