// The edgeagent fleet console: one page, hash routes, every read and action through the
// controller's JSON API (/v1/fleet/...), the session cookie standing for the API token.
// No framework and no build step; DOM built with textContent only (no innerHTML).
"use strict";

const POLL_MS = 2000;
const PAGE = 50;
const CATS = ["applied", "failed", "no_answer", "reverted", "held", "pending", "not_reached",
  "untouched"];
const CAT_LABEL = {applied: "applied", failed: "failed", no_answer: "no answer",
  reverted: "reverted", held: "held", pending: "pending", not_reached: "not reached",
  untouched: "untouched"};

let csrf = "";
let timer = null;
let generation = 0;
let flash = "";  // a message for the next page shown (after an action)

// -- small helpers ---------------------------------------------------------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "on") for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (k === "cls") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function pill(text, kind) { return h("span", {cls: `pill ${kind || text}`}, text); }
function target(t) { return t === "fleet" ? "whole fleet" : `group ${t.replace(/^group:/, "")}`; }
function enc(s) { return encodeURIComponent(s); }

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const opts = {method, credentials: "same-origin", headers: {}};
  if (method !== "GET") opts.headers["X-CSRF-Token"] = csrf;
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  if (r.status === 401) { location.assign("/console/login"); throw new ApiError(401, "signed out"); }
  let data = null;
  try { data = await r.json(); } catch (e) { data = {error: `HTTP ${r.status}`}; }
  if (!r.ok) throw new ApiError(r.status, (data && data.error) || `HTTP ${r.status}`);
  return data;
}

function notice(text, bad) {
  const n = document.getElementById("notice");
  n.textContent = text;
  n.className = bad ? "notice bad" : "notice";
  n.hidden = !text;
}

function confirmDialog(title, rows, okLabel, danger) {
  const dlg = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  const body = document.getElementById("confirm-body");
  body.replaceChildren(h("dl", {}, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
  const ok = document.getElementById("confirm-ok");
  ok.textContent = okLabel;
  ok.className = danger ? "danger" : "primary";
  dlg.returnValue = "";
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), {once: true});
    dlg.showModal();
  });
}

function bar(counts, total) {
  const b = h("div", {cls: "bar", role: "img"});
  const parts = [];
  for (const c of CATS) {
    const n = counts[c] || 0;
    if (!n) continue;
    const s = h("span", {cls: `c-${c}`, title: `${CAT_LABEL[c]}: ${n}`, "data-cat": c});
    s.style.width = `${(100 * n) / Math.max(1, total)}%`;
    b.append(s);
    parts.push(`${CAT_LABEL[c]} ${n}`);
  }
  b.setAttribute("aria-label", parts.join(", ") || "nobody");
  return b;
}

function legend(counts) {
  return h("div", {cls: "legend"}, CATS.filter((c) => counts[c]).map((c) =>
    h("span", {"data-count": c}, h("i", {cls: `c-${c}`}), `${CAT_LABEL[c]} ${counts[c]}`)));
}

// -- routing -----------------------------------------------------------------------------------
const routes = [
  [/^#?\/?$/, overview],
  [/^#\/devices(\?.*)?$/, deviceList],
  [/^#\/device\/([^?]+)$/, devicePage],
  [/^#\/rollouts\/new(\?.*)?$/, newRollout],
  [/^#\/rollouts$/, rolloutList],
  [/^#\/rollout\/([^?]+)$/, rolloutPage],
];

function params(hash) {
  const i = hash.indexOf("?");
  return new URLSearchParams(i < 0 ? "" : hash.slice(i + 1));
}

async function route() {
  generation += 1;
  const mine = generation;
  clearTimeout(timer);
  notice(flash);
  flash = "";
  const hash = location.hash || "#/";
  for (const a of document.querySelectorAll("nav a")) {
    const n = a.dataset.nav;
    a.classList.toggle("on", (n === "overview" && /^#?\/?$/.test(hash)) ||
      (n !== "overview" && hash.startsWith(`#/${n.replace(/s$/, "")}`)));
  }
  for (const [re, view] of routes) {
    const m = hash.match(re);
    if (!m) continue;
    const main = document.getElementById("view");
    // A view returns its refresh function; live views are called again every POLL_MS.
    const tick = async () => {
      if (mine !== generation) return;
      if (document.hidden) { timer = setTimeout(tick, POLL_MS); return; }  // no polls unseen
      let again = false;
      try {
        again = await view(main, m, mine);
        setLive(!!again);
      } catch (e) {
        if (e.status !== 401) notice(`Could not load: ${e.message}`, true);
        again = e.status !== 404 && e.status !== 401;  // gone stays gone; otherwise retry
      }
      if (again && mine === generation) timer = setTimeout(tick, POLL_MS);
    };
    await tick();
    return;
  }
  document.getElementById("view").replaceChildren(h("h1", {}, "No such page"),
    h("p", {}, h("a", {href: "#/"}, "Back to the overview")));
}

function setLive(on) {
  const l = document.getElementById("live");
  l.classList.toggle("off", !on);
  l.textContent = on ? "live" : "still";
}

// Render into main only if this view is still the current one.
function paint(main, mine, ...nodes) {
  if (mine !== generation) return;
  // Keep focus and typed text in forms: views with inputs render their form once.
  main.replaceChildren(...nodes);
}

// -- overview ------------------------------------------------------------------------------
async function overview(main, _m, mine) {
  const s = await api("GET", "/v1/fleet/status");
  const inv = s.inventory;
  const st = inv.by_state || {};
  const table = (head, rows) => h("table", {}, h("thead", {}, h("tr", {}, head.map((x, i) =>
    h("th", {cls: i ? "num" : ""}, x)))), h("tbody", {}, rows));
  const link = (text, q) => h("a", {href: `#/devices?${new URLSearchParams(q)}`}, text);
  const models = Object.entries(inv.models || {});
  paint(main, mine,
    h("h1", {}, "Fleet overview"),
    h("div", {cls: "cards"},
      h("section", {cls: "card", id: "card-devices"}, h("h2", {}, "Devices"),
        h("div", {cls: "big", "data-total": inv.devices}, String(inv.devices)),
        h("div", {}, ["online", "silent", "offline", "stopped", "unknown"].filter((k) => st[k])
          .map((k) => [link(pill(`${k} ${st[k]}`, k), {state: k}), " "])),
        h("p", {cls: "muted"}, inv.with_errors ? link(`${inv.with_errors} with errors`,
          {error: ":"}) : "no device reports an error")),
      h("section", {cls: "card", id: "card-profiles"}, h("h2", {}, "By profile"),
        table(["profile", "devices"], Object.entries(inv.profiles || {}).map(([p, n]) =>
          h("tr", {}, h("td", {}, link(p, {profile: p})), h("td", {cls: "num"}, n))))),
      h("section", {cls: "card", id: "card-groups"}, h("h2", {}, "By group"),
        table(["group", "devices"], Object.entries(inv.groups || {}).map(([g, n]) =>
          h("tr", {}, h("td", {}, link(g, {group: g})), h("td", {cls: "num"}, n))))),
      h("section", {cls: "card wide", id: "card-models"}, h("h2", {}, "Models: versions and what decided them"),
        models.length ? table(["model", "version", "devices", "decided by (devices)", "failing"],
          models.flatMap(([name, m]) => Object.entries(m.versions).map(([v, n], i) =>
            h("tr", {"data-model": name, "data-version": v},
              h("td", {}, i ? "" : link(name, {model: name})),
              h("td", {cls: "num"}, link(v === "none" ? "none" : `v${v}`,
                v === "none" ? {model: name} : {model: name, version: v})),
              h("td", {cls: "num"}, n),
              h("td", {cls: "num"}, Object.entries((m.decided || {})[v] || {})
                .map(([k, c]) => `${k}: ${c}`).join(", ")),
              h("td", {cls: "num err"}, i ? "" : (inv.failing_models || {})[name] || ""))))) :
          h("p", {cls: "muted"}, "No device has reported a model yet.")),
      h("section", {cls: "card wide", id: "card-rollouts"}, h("h2", {}, "Rollouts in progress"),
        s.rollouts.length ? table(["rollout", "model", "target", "phase", "wave", "share"],
          s.rollouts.map((r) => h("tr", {},
            h("td", {}, h("a", {href: `#/rollout/${enc(r.rollout_id)}`}, r.rollout_id)),
            h("td", {cls: "num"}, `${r.model} v${r.version}`), h("td", {cls: "num"}, target(r.target)),
            h("td", {cls: "num"}, pill(r.phase)), h("td", {cls: "num"}, r.wave),
            h("td", {cls: "num"}, `${r.share} %`)))) :
          h("p", {cls: "muted"}, "None. ", h("a", {href: "#/rollouts/new"}, "Start a rollout"))),
      h("section", {cls: "card wide muted"},
        `Controller ${s.controller.version} (replica ${s.controller.replica}); broker ` +
        `${s.broker.connected ? "connected" : "NOT connected"}; catch-up ${s.catchup.state}.`)));
  return true;
}

// -- device list -----------------------------------------------------------------------------
const FILTERS = [["group", "group"], ["profile", "profile"], ["model", "model"],
  ["version", "version"], ["state", "state"], ["error", "error text"]];

async function deviceList(main, m, mine) {
  const q = params(m[0]);
  const after = q.get("after") || "";
  // The cursors of the pages before this one ("" is the first page); ids have no commas.
  const back = q.has("back") ? q.get("back").split(",") : [];
  const query = new URLSearchParams();
  for (const [k] of FILTERS) if (q.get(k)) query.set(k, q.get(k));
  const page = await api("GET", `/v1/fleet/devices?${query}&limit=${PAGE}&total=1&after=${enc(after)}`);
  const form = h("form", {cls: "filters", id: "filters", on: {submit: (e) => {
    e.preventDefault();
    const f = new URLSearchParams();
    for (const [k] of FILTERS) { const v = e.target.elements[k].value.trim(); if (v) f.set(k, v); }
    location.hash = `#/devices?${f}`;
  }}}, FILTERS.map(([k, label]) => h("div", {}, h("label", {for: `f-${k}`}, label),
    k === "state" ?
      h("select", {id: `f-${k}`, name: k}, ["", "online", "silent", "offline", "stopped", "unknown"]
        .map((v) => h("option", {value: v, selected: q.get(k) === v}, v || "any"))) :
      h("input", {id: `f-${k}`, name: k, value: q.get(k) || "",
        inputmode: k === "version" ? "numeric" : null}))),
  h("button", {type: "submit", cls: "primary"}, "Filter"),
  h("a", {href: "#/devices"}, "clear"));
  const start = back.length * PAGE;
  const pageLink = (a, b) => {
    const p = new URLSearchParams(query);
    if (a) p.set("after", a);
    if (b.length) p.set("back", b.join(","));
    else p.delete("back");
    return `#/devices?${p}`;
  };
  const prev = back.length ? pageLink(back[back.length - 1], back.slice(0, -1)) : null;
  const next = page.next ? pageLink(page.next, [...back, after]) : null;
  const pager = h("div", {cls: "pager"},
    prev ? h("a", {href: prev, id: "prev"}, "‹ previous") : h("span", {cls: "muted"}, "‹ previous"),
    h("span", {id: "range"}, page.devices.length ?
      `${start + 1}-${start + page.devices.length} of ${page.total}` : `0 of ${page.total}`),
    next ? h("a", {href: next, id: "next"}, "next ›") : h("span", {cls: "muted"}, "next ›"));
  paint(main, mine, h("h1", {}, "Devices"), form, pager,
    h("table", {id: "devices"}, h("thead", {}, h("tr", {}, ["device", "state", "last seen",
      "profile", "groups", "models", "last error"].map((x) => h("th", {}, x)))),
    h("tbody", {}, page.devices.map((d) => h("tr", {"data-device": d.device_id},
      h("td", {}, h("a", {href: `#/device/${enc(d.device_id)}`}, d.device_id)),
      h("td", {}, pill(d.online ? "online" : d.state === "online" ? "silent" : d.state)),
      h("td", {}, ago(d.last_seen)), h("td", {}, d.profile),
      h("td", {}, d.tags.join(", ")),
      h("td", {}, Object.entries(d.models).map(([n, mm]) => `${n} v${mm.version ?? "?"}`).join(", ")),
      h("td", {cls: "err"}, d.last_error))))),
    page.devices.length ? bottomPager(pager) : h("p", {cls: "muted"}, "No device matches."));
  return false;
}

function bottomPager(pager) {
  const copy = pager.cloneNode(true);
  for (const el of copy.querySelectorAll("[id]")) el.removeAttribute("id");
  return copy;
}

// -- device page -----------------------------------------------------------------------------
function series(points) {
  // Request rate (per second), latency p50/p99 (worst model), CPU %, temperature (hottest).
  const out = {rate: [], p50: [], p99: [], cpu: [], temp: []};
  let prev = null;
  for (const p of points) {
    const t = p.ts || p.received;
    const models = Object.values(p.models || {});
    let reqs = 0;
    let total = 0;
    let hasTotal = true;
    let p50 = null;
    let p99 = null;
    for (const mm of models) {
      reqs += mm.requests || 0;
      if (typeof mm.requests_total === "number") total += mm.requests_total; else hasTotal = false;
      const l = mm.latency_ms || {};
      if (typeof l.p50 === "number") p50 = Math.max(p50 ?? 0, l.p50);
      if (typeof l.p99 === "number") p99 = Math.max(p99 ?? 0, l.p99);
    }
    if (p.interval_s) out.rate.push([t, reqs / p.interval_s]);
    else if (prev && t > prev.t) {
      const d = hasTotal && prev.hasTotal ? total - prev.total : reqs - prev.reqs;
      out.rate.push([t, Math.max(0, d) / (t - prev.t)]);
    }
    prev = {t, reqs, total, hasTotal};
    if (p50 !== null) out.p50.push([t, p50]);
    if (p99 !== null) out.p99.push([t, p99]);
    const sys = p.system || {};
    if (typeof sys.cpu_percent === "number") out.cpu.push([t, sys.cpu_percent]);
    const temps = Object.values(sys.temperatures_c || {}).filter((x) => typeof x === "number");
    if (temps.length) out.temp.push([t, Math.max(...temps)]);
  }
  return out;
}

function chart(title, unit, lines, id) {
  const W = 300;
  const H = 90;
  const all = lines.flatMap((l) => l.points);
  const box = svg("svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
    "aria-label": title});
  const wrap = h("div", {cls: "chart card", id}, h("h2", {}, title), box);
  if (all.length < 2) {
    const t = svg("text", {x: 8, y: 50});
    t.textContent = "not enough telemetry yet";
    box.append(t);
    return wrap;
  }
  const t0 = Math.min(...all.map((p) => p[0]));
  const t1 = Math.max(...all.map((p) => p[0]));
  const hi = Math.max(...all.map((p) => p[1])) * 1.1 || 1;
  lines.forEach((l, i) => {
    const pts = l.points.map(([t, v]) =>
      `${((t - t0) / Math.max(1e-9, t1 - t0)) * (W - 4) + 2},${H - 14 - (v / hi) * (H - 24)}`);
    box.append(svg("polyline", {points: pts.join(" "), class: i ? "second" : ""}));
  });
  const last = lines.map((l) => l.points.length ?
    `${l.name} ${l.points[l.points.length - 1][1].toFixed(1)} ${unit}` : "").filter(Boolean);
  const label = svg("text", {x: 4, y: H - 3});
  label.textContent = `${last.join(" · ")} (max ${(hi / 1.1).toFixed(1)})`;
  box.append(label);
  return wrap;
}

async function devicePage(main, m, mine) {
  const id = decodeURIComponent(m[1]);
  const [d, tel] = await Promise.all([api("GET", `/v1/fleet/devices/${enc(id)}`),
    api("GET", `/v1/fleet/devices/${enc(id)}/telemetry`)]);
  const rep = d.reported || {};
  const models = Object.entries(rep.models || {});
  const pins = d.pins || {};
  const s = series(tel.points || []);
  const pinForm = h("form", {cls: "filters", id: "pin-form", on: {submit: async (e) => {
    e.preventDefault();
    const model = e.target.elements.model.value.trim();
    const version = parseInt(e.target.elements.version.value, 10);
    if (!(await confirmDialog("Pin a model on this device",
      [["device", id], ["model", model], ["version", `v${version}`]], "Pin", false))) return;
    try {
      await api("PUT", `/v1/fleet/devices/${enc(id)}/pins/${enc(model)}`, {version});
      flash = `Pinned ${model} v${version} on ${id}.`;
      route();
    } catch (err) { notice(`Pin refused: ${err.message}`, true); }
  }}}, h("div", {}, h("label", {for: "pin-model"}, "model"),
    h("input", {id: "pin-model", name: "model", required: true,
      value: models.length ? models[0][0] : ""})),
  h("div", {}, h("label", {for: "pin-version"}, "version"),
    h("input", {id: "pin-version", name: "version", required: true, inputmode: "numeric",
      pattern: "[0-9]+"})),
  h("button", {type: "submit", cls: "primary"}, "Pin…"));
  const unpin = (model) => async () => {
    if (!(await confirmDialog("Unpin a model", [["device", id], ["model", model]], "Unpin",
      true))) return;
    try {
      await api("DELETE", `/v1/fleet/devices/${enc(id)}/pins/${enc(model)}`);
      flash = `Unpinned ${model} on ${id}.`;
      route();
    } catch (err) { notice(`Unpin refused: ${err.message}`, true); }
  };
  const online = d.state === "online";
  const header = [h("h1", {}, `Device ${id} `, pill(online ? "online" : d.state)),
    h("dl", {cls: "facts card"},
      h("dt", {}, "last seen"), h("dd", {}, ago(d.last_seen)),
      h("dt", {}, "agent"), h("dd", {}, d.agent_version || "?"),
      h("dt", {}, "profile"), h("dd", {}, `${(rep.profile || {}).name || "?"}`,
        (rep.profile || {}).reason ? h("span", {cls: "muted"}, ` (${rep.profile.reason})`) : ""),
      h("dt", {}, "groups"), h("dd", {}, (rep.tags || []).join(", ") || "none"),
      h("dt", {}, "desired"), h("dd", {}, `${(rep.desired || {}).state || "?"}`,
        (rep.desired || {}).error ? h("span", {cls: "err"}, ` ${rep.desired.error}`) : ""))];
  const modelsTable = h("table", {id: "models"}, h("thead", {}, h("tr", {}, ["model", "version",
    "state", "variant", "provider", "decided by", "last error", "pin"].map((x) => h("th", {}, x)))),
  h("tbody", {}, models.map(([name, mm]) => h("tr", {"data-model": name},
    h("td", {}, name), h("td", {}, `v${mm.version ?? "?"}`), h("td", {}, mm.state || ""),
    h("td", {}, mm.variant || ""), h("td", {}, mm.provider || "",
      mm.fallback ? h("span", {cls: "muted"}, ` (fallback: ${mm.fallback})`) : ""),
    h("td", {}, mm.source_kind || "", h("div", {cls: "muted"}, mm.source || "")),
    h("td", {cls: "err"}, mm.last_error || ""),
    h("td", {}, pins[name] ? [`v${pins[name].version} `,
      h("button", {type: "button", "data-unpin": name, on: {click: unpin(name)}}, "Unpin…")] : "")))));
  const charts = h("div", {cls: "charts", id: "charts"},
    chart("Requests", "/s", [{name: "rate", points: s.rate}], "chart-rate"),
    chart("Latency", "ms", [{name: "p50", points: s.p50}, {name: "p99", points: s.p99}],
      "chart-latency"),
    chart("CPU", "%", [{name: "cpu", points: s.cpu}], "chart-cpu"),
    chart("Temperature", "°C", [{name: "hottest", points: s.temp}], "chart-temp"));
  // The layout (with the pin form and what is typed in it) is built once per visit; each
  // refresh replaces the live sections only.
  let shell = main.querySelector("#device-page");
  if (!shell || shell.dataset.gen !== String(mine)) {
    shell = h("div", {id: "device-page", "data-gen": mine}, h("div", {id: "dev-head"}),
      h("h2", {}, "Models"), h("div", {id: "dev-models"}),
      h("h2", {}, "Pin a version (this device only, above every rollout)"), pinForm,
      h("h2", {id: "dev-tel-title"}), h("div", {id: "dev-charts"}));
    paint(main, mine, shell);
  }
  shell.querySelector("#dev-head").replaceChildren(...header);
  shell.querySelector("#dev-models").replaceChildren(modelsTable);
  shell.querySelector("#dev-tel-title").textContent =
    `Recent telemetry (${(tel.points || []).length} points)`;
  shell.querySelector("#dev-charts").replaceChildren(charts);
  return true;
}

// -- rollouts ---------------------------------------------------------------------------------
async function rolloutList(main, _m, mine) {
  const {rollouts} = await api("GET", "/v1/fleet/rollouts?limit=50");
  paint(main, mine, h("h1", {}, "Rollouts"),
    h("div", {cls: "actions"}, h("a", {href: "#/rollouts/new", id: "new-rollout",
      cls: "button primary"}, "Start a rollout…")),
    rollouts.length ? h("table", {id: "rollouts"}, h("thead", {}, h("tr", {}, ["rollout", "kind",
      "model", "target", "phase", "wave", "progress", "summary"].map((x) => h("th", {}, x)))),
    h("tbody", {}, rollouts.map((r) => h("tr", {"data-rollout": r.rollout_id},
      h("td", {}, h("a", {href: `#/rollout/${enc(r.rollout_id)}`}, r.rollout_id)),
      h("td", {}, r.kind), h("td", {}, `${r.model} v${r.version}`), h("td", {}, target(r.target)),
      h("td", {}, pill(r.phase)), h("td", {}, `${r.wave} of ${r.plan.waves.length}`),
      h("td", {}, bar(r.counts, r.members)), h("td", {cls: "muted"}, r.summary))))) :
      h("p", {cls: "muted"}, "No rollout yet."));
  return rollouts.some((r) => ["running", "paused", "reverting"].includes(r.phase));
}

async function newRollout(main, m, mine) {
  const q = params(m[0]);
  const groups = (await api("GET", "/v1/fleet/groups")).groups;
  const field = (id, label, attrs, hint) => h("div", {}, h("label", {for: id}, label),
    h("input", {id, name: id, ...attrs}), hint ? h("div", {cls: "muted"}, hint) : null);
  const form = h("form", {cls: "stack card", id: "rollout-form", on: {submit: async (e) => {
    e.preventDefault();
    const f = e.target.elements;
    const body = {model: f.model.value.trim(), version: parseInt(f.version.value, 10)};
    const t = f.target.value;
    if (t === "fleet") body.fleet = true; else body.group = t.replace(/^group:/, "");
    for (const k of ["waves", "max_failures"]) if (f[k].value.trim()) body[k] = f[k].value.trim();
    if (f.min_devices.value.trim()) body.min_devices = parseInt(f.min_devices.value, 10);
    if (f.wave_timeout_s.value.trim()) body.wave_timeout_s = parseFloat(f.wave_timeout_s.value);
    const n = t === "fleet" ? Object.values(groups).reduce((a, b) => Math.max(a, b), 0) : groups[body.group];
    const ok = await confirmDialog("Start this rollout?", [["model", `${body.model} v${body.version}`],
      ["target", target(t)], ["devices", t === "fleet" ? "every device in the inventory" : `${n ?? 0}`],
      ["waves", body.waves || "the controller's default"],
      ["abort above", body.max_failures || "the controller's default"],
      ["min devices per wave", body.min_devices ?? "default"],
      ["wave timeout", body.wave_timeout_s ? `${body.wave_timeout_s} s` : "default"]],
    "Start rollout", false);
    if (!ok) return;
    try {
      const r = await api("POST", "/v1/fleet/rollouts", body);
      flash = `Rollout ${r.rollout_id} started.`;
      location.hash = `#/rollout/${enc(r.rollout_id)}`;
    } catch (err) { notice(`Refused: ${err.message}`, true); }
  }}},
  field("model", "model", {required: true, value: q.get("model") || ""}),
  field("version", "version", {required: true, inputmode: "numeric", pattern: "[0-9]+"}),
  h("div", {}, h("label", {for: "target"}, "target"), h("select", {id: "target", name: "target"},
    Object.entries(groups).map(([g, n]) => h("option", {value: `group:${g}`}, `group ${g} (${n} devices)`)),
    h("option", {value: "fleet"}, "the whole fleet"))),
  field("waves", "waves", {placeholder: "1%,10%,50%,100%"}, "shares of the target, in order, ending at 100%"),
  field("max_failures", "failure threshold", {placeholder: "5%"},
    "abort as soon as a wave's failures pass this share of its reachable devices"),
  field("min_devices", "min devices per wave", {inputmode: "numeric"}),
  field("wave_timeout_s", "wave timeout (s)", {inputmode: "decimal"}),
  h("div", {cls: "actions"}, h("button", {type: "submit", cls: "primary", id: "rollout-submit"},
    "Review and start…"), h("a", {href: "#/rollouts"}, "cancel")));
  paint(main, mine, h("h1", {}, "Start a rollout"), form);
  return false;
}

async function rolloutPage(main, m, mine) {
  const id = decodeURIComponent(m[1]);
  const [r, errs] = await Promise.all([api("GET", `/v1/fleet/rollouts/${enc(id)}`),
    api("GET", `/console/api/rollouts/${enc(id)}/errors`)]);
  const act = (action, danger) => async () => {
    const ok = await confirmDialog(`${action[0].toUpperCase()}${action.slice(1)} rollout ${id}?`,
      [["model", `${r.model} v${r.version}`], ["target", target(r.target)], ["phase", r.phase],
        ["effect", action === "abort" ? "every device that switched goes back to the version it ran before"
          : action === "pause" ? "no device switches until it is resumed" : "the waves go on"]],
      action[0].toUpperCase() + action.slice(1), danger);
    if (!ok) return;
    try {
      await api("POST", `/v1/fleet/rollouts/${enc(id)}/${action}`);
      flash = `Rollout ${id}: ${action} sent.`;
      route();
    } catch (err) { notice(`Refused: ${err.message}`, true); }
  };
  const buttons = [];
  if (r.phase === "running") buttons.push(h("button", {type: "button", id: "pause", on: {click: act("pause")}}, "Pause…"));
  if (r.phase === "paused") buttons.push(h("button", {type: "button", id: "resume", cls: "primary", on: {click: act("resume")}}, "Resume…"));
  if (["running", "paused"].includes(r.phase)) buttons.push(h("button", {type: "button", id: "abort", cls: "danger", on: {click: act("abort", true)}}, "Abort…"));
  const plan = r.plan.waves;
  const waves = plan.map((pct, i) => {
    const w = r.waves[i];
    const errors = ((errs.waves || [])[i] || {}).errors || [];
    if (!w) {
      return h("div", {cls: "wave", "data-wave": i + 1}, h("strong", {}, `Wave ${i + 1}: ${pct} %`),
        " ", h("span", {cls: "muted"}, "not started"));
    }
    const counts = w.counts;
    // The wave's members (after an abort, those that never switched count as untouched).
    const inWave = CATS.reduce((a, c) => a + (counts[c] || 0), 0);
    return h("div", {cls: "wave", "data-wave": i + 1, "data-result": w.result},
      h("strong", {}, `Wave ${i + 1}: ${pct} %`), " ", pill(w.result, w.result === "complete" ? "done" : w.result),
      h("span", {cls: "muted"}, ` share ${w.share} %, ${inWave} device${inWave === 1 ? "" : "s"}, started ${ago(w.started)}`),
      bar(counts, inWave), legend(counts),
      errors.length ? h("ul", {cls: "errors"}, errors.map((e) =>
        h("li", {"data-devices": e.devices}, h("span", {cls: "err"}, e.error), ` — ${e.devices} device${e.devices === 1 ? "" : "s"}`))) : null);
  });
  paint(main, mine,
    h("h1", {}, `Rollout ${id} `, pill(r.phase)),
    h("dl", {cls: "facts card"},
      h("dt", {}, "model"), h("dd", {}, `${r.model} v${r.version}`,
        r.from_version ? h("span", {cls: "muted"}, ` (from v${r.from_version})`) : ""),
      h("dt", {}, "target"), h("dd", {}, `${target(r.target)}, ${r.members} devices`),
      h("dt", {}, "plan"), h("dd", {}, `waves ${plan.map((x) => `${x}%`).join(", ")}; abort above ` +
        `${r.plan.max_failures} % failures; at least ${r.plan.min_devices} ` +
        `device${r.plan.min_devices === 1 ? "" : "s"} per wave; ` +
        `${r.plan.wave_timeout_s} s per wave`),
      h("dt", {}, "now"), h("dd", {id: "summary"}, r.summary),
      h("dt", {}, "document"), h("dd", {}, `${r.document.state} at ${r.document.share} %` +
        (r.document.published ? "" : " (publishing)")),
      h("dt", {}, "updated"), h("dd", {}, ago(r.updated))),
    h("div", {cls: "actions"}, buttons),
    h("section", {cls: "card", id: "progress"}, h("h2", {}, "Overall"),
      bar(r.counts, r.members), legend(r.counts),
      h("p", {cls: "muted", id: "running"}, `${r.running_version} of ${r.members} devices run v${r.version}`)),
    h("section", {cls: "card", id: "waves"}, h("h2", {}, "Waves"), waves));
  // Live while it runs, and for two minutes after (late devices still report going back).
  return ["running", "paused", "reverting"].includes(r.phase) ||
    (r.finished && Date.now() / 1000 - r.finished < 120);
}

// -- start ------------------------------------------------------------------------------------
async function start() {
  // The page's first read and the session's CSRF token, fetched together.
  const session = api("GET", "/console/api/session");
  window.addEventListener("hashchange", route);
  route();
  try {
    csrf = (await session).csrf;
  } catch (e) { return; }
  document.getElementById("logout").addEventListener("click", async () => {
    await api("POST", "/console/logout");
    location.assign("/console/login");
  });
}

document.addEventListener("DOMContentLoaded", start);
