"""The web console in a real headless browser (Debian's chromium driven by Playwright) against a
real controller process, a real Mosquitto and simulated devices.

Screenshots go to the test's tmp dir; with ``EDGEAGENT_CONSOLE_SCREENSHOTS=DIR`` they are also
copied there (``docs/console/`` holds the ones the docs describe).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.console import fill_inventory
from edgeagent.fleet.store import Batch, open_store
from tests.fleet.conftest import Controller, SimThread, until

CHROMIUM = os.environ.get("EDGEAGENT_TEST_CHROMIUM", "/usr/bin/chromium")

pytestmark = pytest.mark.slow

EVIL = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


@pytest.fixture
def browser() -> Iterator[Any]:
    # (wait_for_function cannot run here: the console's CSP forbids eval, as it should.)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("needs playwright: pip install -e '.[test]'")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"needs a chromium at {CHROMIUM}: apt-get install -y chromium "
                    "(scripts/run-tests does it when run as root)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("EDGEAGENT_CONSOLE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


def open_console(browser: Any, c: Controller, tmp_path: Path) -> Any:
    """A fresh browser context signed in: the wrong token first (refused), then the right one."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and
            "401" not in m.text and "403" not in m.text else None)
    page.errors = errors
    page.goto(f"{c.url}/console/")
    assert page.url.endswith("/console/login")
    page.fill("#token", "wrong-token-wrong-token")
    page.click("button[type=submit]")
    page.wait_for_selector("p.error")
    assert "Wrong token" in page.inner_text("p.error")
    assert page.url.endswith("/console/login")
    assert page.context.cookies() == []
    page.fill("#token", c.token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/console/(#.*)?$"))
    page.wait_for_selector("#card-devices")
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # out of the page's scripts' reach
    return page


def confirm(page: Any) -> None:
    page.wait_for_selector("dialog#confirm[open]")
    page.click("#confirm-ok")
    page.wait_for_selector("dialog#confirm:not([open])", state="attached")


def counts_in(page: Any, scope: str) -> dict[str, int]:
    out = {}
    for el in page.query_selector_all(f"{scope} .legend [data-count]"):
        out[el.get_attribute("data-count")] = int(el.inner_text().rsplit(" ", 1)[1])
    return out


def test_a_rollout_started_watched_and_aborted_from_the_console(  # noqa: PLR0915 - one story
        mosquitto: Any, controllers: Any, sims: Any, browser: Any, tmp_path: Path) -> None:
    c: Controller = controllers(mosquitto).start()
    # Slow activations (6 s): the first wave is still going when abort is clicked.
    sim: SimThread = sims(mosquitto, 20, activation_s=6.0, telemetry_interval_s=0.5)
    until(lambda: c.inventory() == 20, "20 devices in the inventory")
    page = open_console(browser, c, tmp_path)
    page.wait_for_selector("#card-devices [data-total='20']")
    assert "sim" in page.inner_text("#card-profiles")
    row = page.inner_text("#card-models tr[data-model=mlp][data-version='1']")
    assert "v1" in row and "20" in row and "config: 20" in row  # what decided the version

    # A device page: its models and telemetry charts.
    page.goto(f"{c.url}/console/#/device/sim-000003")
    page.wait_for_selector("#models tr[data-model=mlp]")
    row = page.inner_text("#models tr[data-model=mlp]")
    assert "v1" in row and "model.onnx" in row and "CPUExecutionProvider" in row
    page.wait_for_selector("#chart-cpu polyline", state="attached", timeout=30_000)
    page.wait_for_selector("#chart-latency polyline.second", state="attached")
    shot(page, tmp_path, "device")

    # Start a rollout from the form, with a confirmation.
    page.goto(f"{c.url}/console/#/rollouts/new")
    page.fill("#model", "mlp")
    page.fill("#version", "2")
    page.select_option("#target", "group:sim")
    page.fill("#waves", "10%,50%,100%")
    page.fill("#max_failures", "50%")
    page.fill("#min_devices", "2")
    page.fill("#wave_timeout_s", "120")
    page.click("#rollout-submit")
    page.wait_for_selector("dialog#confirm[open]")
    assert "mlp v2" in page.inner_text("#confirm-body")
    assert "group sim" in page.inner_text("#confirm-body")
    page.click("#confirm-cancel")  # cancelled: nothing started
    assert c.get("/v1/fleet/rollouts")["rollouts"] == []
    page.click("#rollout-submit")
    confirm(page)
    page.wait_for_url(re.compile(r"#/rollout/r-"))
    rid = page.url.rsplit("/", 1)[1]
    assert [r["rollout_id"] for r in c.get("/v1/fleet/rollouts")["rollouts"]] == [rid]

    # Its progress shows and moves by itself (the page polls): pending, then applied.
    page.wait_for_selector("#waves [data-wave='1'] .bar [data-cat=pending]")
    page.wait_for_selector("#waves [data-wave='1'] .bar [data-cat=applied]", timeout=60_000)
    first = counts_in(page, "#waves [data-wave='1']")
    assert first["applied"] >= 1, first
    assert "running" in page.inner_text("h1")
    shot(page, tmp_path, "rollout")

    # Pause and resume, each confirmed.
    page.click("#pause")
    confirm(page)
    page.wait_for_selector("h1 .pill.paused")
    assert c.get(f"/v1/fleet/rollouts/{rid}")["phase"] == "paused"
    page.click("#resume")
    confirm(page)
    page.wait_for_selector("h1 .pill.running")

    # Abort, confirmed; the devices that switched are seen going back.
    page.click("#abort")
    assert "goes back" in page.inner_text("#confirm-body")
    confirm(page)
    page.wait_for_selector("h1 .pill.aborted", timeout=90_000)
    # The page keeps updating after the abort: every device seen back on v1.
    expect(page.locator("#running")).to_have_text("0 of 20 devices run v2", timeout=60_000)
    until(lambda: set(sim.versions().values()) == {1}, "every device back on v1", 30)
    switched = [d for d in sim.sim.devices if ("mlp", 2) in d.history]
    assert switched
    final = until(lambda: (f := c.get(f"/v1/fleet/rollouts/{rid}"))["counts"]["reverted"]
                  == len(switched) and f, "the reverts reported", 30)
    assert final["phase"] == "aborted" and final["running_version"] == 0
    expect(page.locator("#progress .legend [data-count=reverted]")).to_have_text(
        f"reverted {len(switched)}", timeout=30_000)
    assert not page.query_selector("#abort")  # nothing left to abort
    assert set(sim.versions().values()) == {1}
    shot(page, tmp_path, "rollout-aborted")

    # The rollouts list shows it; the device list finds nobody left on v2.
    page.goto(f"{c.url}/console/#/rollouts")
    page.wait_for_selector(f"#rollouts tr[data-rollout='{rid}'] .pill.aborted")
    page.goto(f"{c.url}/console/#/devices?model=mlp&version=2")
    expect(page.locator("#range")).to_have_text("0 of 0")

    # Pin and unpin a device, each confirmed, through the API.
    page.goto(f"{c.url}/console/#/device/sim-000003")
    page.wait_for_selector("#pin-form")
    page.fill("#pin-version", "3")
    page.click("#pin-form button[type=submit]")
    confirm(page)
    page.wait_for_selector("#notice:not([hidden])")
    assert "Pinned mlp v3" in page.inner_text("#notice")
    assert c.get("/v1/fleet/devices/sim-000003")["pins"] == {"mlp": {"version": 3}}
    until(lambda: sim.versions()["sim-000003"] == 3, "the pinned device on v3", 60)
    page.wait_for_selector("button[data-unpin=mlp]")
    page.click("button[data-unpin=mlp]")
    confirm(page)
    until(lambda: c.get("/v1/fleet/devices/sim-000003")["pins"] == {}, "the pin gone", 30)
    assert page.errors == []


def test_the_device_list_filters_and_pages_10000_devices(  # noqa: PLR0915 - one story
        mosquitto: Any, controllers: Any, browser: Any, tmp_path: Path) -> None:
    c: Controller = controllers(mosquitto).start()
    fill_inventory(str(c.dir / "fleet.db"), 10_000)
    page = open_console(browser, c, tmp_path)
    page.wait_for_selector("#card-devices [data-total='10000']")
    assert "jetson" in page.inner_text("#card-profiles")
    shot(page, tmp_path, "overview")

    page.goto(f"{c.url}/console/#/devices")
    page.wait_for_selector("#range")
    assert page.inner_text("#range") == "1-50 of 10000"
    assert len(page.query_selector_all("#devices tbody tr")) == 50
    page.click("#next")
    expect(page.locator("#range")).to_have_text(re.compile("^51-"))
    assert page.inner_text("#range") == "51-100 of 10000"
    assert page.inner_text("#devices tbody tr:first-child td:first-child") == "dev-00050"
    page.click("#prev")
    expect(page.locator("#range")).to_have_text(re.compile("^1-"))

    # Filters, combined, from the form (the server filters; the page shows one page).
    page.fill("#f-profile", "jetson")
    page.select_option("#f-state", "online")
    page.fill("#f-group", "g0")
    page.click("#filters button[type=submit]")
    expect(page.locator("#range")).to_have_text(re.compile("of 667$"))
    assert page.inner_text("#range") == "1-50 of 667"
    ids = [e.inner_text() for e in page.query_selector_all("#devices tbody tr td:first-child")]
    assert all(int(i[4:]) % 12 == 0 and int(i[4:]) % 10 for i in ids)
    page.fill("#f-error", "out of memory")
    page.fill("#f-profile", "")
    page.select_option("#f-state", "")
    page.fill("#f-group", "")
    page.click("#filters button[type=submit]")
    expect(page.locator("#range")).to_have_text(re.compile("of 104$"))
    assert "out of memory" in page.inner_text("#devices tbody tr:first-child")
    page.fill("#f-error", "")
    page.fill("#f-model", "mlp")
    page.fill("#f-version", "2")
    page.click("#filters button[type=submit]")
    expect(page.locator("#range")).to_have_text(re.compile("of 5000$"))
    shot(page, tmp_path, "devices")

    # A device whose reports carry markup: the console shows it as text, never runs it.
    store = open_store(str(c.dir / "fleet.db"))
    batch = Batch()
    evil = batch.device("dev-evil")
    evil.seen = time.time()
    evil.reported = {"ts": time.time(), "tags": ["<b>g</b>"], "profile": {"name": "<i>p</i>"},
                     "models": {"mlp": {"version": 1, "last_error": EVIL}}}
    store.apply(batch)
    store.close()
    page.fill("#f-model", "")
    page.fill("#f-version", "")
    page.fill("#f-error", "onerror")
    page.click("#filters button[type=submit]")
    expect(page.locator("#range")).to_have_text("1-1 of 1")
    assert EVIL in page.inner_text("#devices tr[data-device=dev-evil]")
    assert page.query_selector("#devices img") is None
    assert page.title() == "edgeagent fleet"
    page.click("#devices tr[data-device=dev-evil] a")
    page.wait_for_selector("#models tr[data-model=mlp]")
    assert EVIL in page.inner_text("#models")
    assert page.query_selector("main img, main b, main i") is None
    assert page.title() == "edgeagent fleet"

    # An action without the session's CSRF token, or from another origin, is refused.
    refused = page.evaluate("""async () => {
        const r = await fetch('/v1/fleet/rollouts', {method: 'POST', credentials: 'same-origin',
          headers: {'Content-Type': 'application/json'},
          body: JSON.stringify({model: 'mlp', version: 2, fleet: true})});
        return [r.status, (await r.json()).error];
    }""")
    assert refused[0] == 403 and "X-CSRF-Token" in refused[1]
    assert c.get("/v1/fleet/rollouts")["rollouts"] == []
    # Signing out ends the session.
    page.click("#logout")
    page.wait_for_url(re.compile(r"/console/login$"))
    page.goto(f"{c.url}/console/")
    assert page.url.endswith("/console/login")


def test_a_failing_rollout_shows_its_errors_grouped_per_wave(
        mosquitto: Any, controllers: Any, sims: Any, browser: Any, tmp_path: Path) -> None:
    c: Controller = controllers(mosquitto).start()
    sim: SimThread = sims(mosquitto, 20, activation_s=0.2, failing=0.4)
    until(lambda: c.inventory() == 20, "20 devices in the inventory")
    failing = [d for d in sim.sim.devices if d.fails("mlp", 2)]
    assert failing
    status, r = c.api("POST", "/v1/fleet/rollouts", {  # started by the CLI's API this time
        "model": "mlp", "version": 2, "group": "sim", "waves": "50%,100%", "min_devices": 1,
        "max_failures": "100%"})
    assert status == 201, r
    page = open_console(browser, c, tmp_path)
    page.goto(f"{c.url}/console/#/rollouts")
    page.wait_for_selector(f"#rollouts tr[data-rollout='{r['rollout_id']}']")
    page.click(f"#rollouts tr[data-rollout='{r['rollout_id']}'] a")
    # Live: the page follows it to the end by itself.
    page.wait_for_selector("h1 .pill.done", timeout=90_000)
    final = c.get(f"/v1/fleet/rollouts/{r['rollout_id']}")
    assert final["counts"]["failed"] == len(failing)
    assert counts_in(page, "#progress")["failed"] == len(failing)
    errors = page.query_selector_all("#waves ul.errors li")
    assert errors
    for li in errors:
        assert "v2 failed its checks on this device" in li.inner_text()
    total = sum(int(li.get_attribute("data-devices")) for li in errors)
    assert total == len(failing)
    shot(page, tmp_path, "rollout-failed")
    # The overview says which version each device runs and what decided it.
    page.goto(f"{c.url}/console/#/")
    ran = 20 - len(failing)
    row = page.locator("#card-models tr[data-model=mlp][data-version='2']")
    expect(row).to_contain_text(f"group-rollout: {ran}", timeout=30_000)
    # The devices that failed v2 still run v1, and are the model's failing devices.
    cells = page.inner_text("#card-models tr[data-model=mlp][data-version='1']").split("\t")
    assert cells[0] == "mlp" and cells[1] == "v1" and cells[2] == str(len(failing))
    assert cells[4] == str(len(failing))
    shot(page, tmp_path, "overview-after-rollout")
