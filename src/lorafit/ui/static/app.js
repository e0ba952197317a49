/* lorafit ui: the page of `lorafit ui` (runs, a run live, compare, sweeps, will it fit?).
 *
 * Plain JavaScript, no build step and no framework: a hash router renders one page at a time into
 * #app from the JSON API of src/lorafit/ui (contract: docs/ui.md). Every element a test needs has a
 * data-testid. Text from the API is always set as textContent; only the server's own SVG charts are
 * inserted as markup. The page makes no request beyond its own origin (the server's CSP forbids it).
 *
 * Charts of a run: uPlot 1.6.32 (MIT, https://github.com/leeoniya/uPlot), vendored from the npm
 * registry (`npm pack uplot@1.6.32`: dist/uPlot.iife.min.js, dist/uPlot.min.css, LICENSE) into
 * static/vendor/ unchanged; see static/vendor/README.
 */
"use strict";

// ------------------------------------------------------------------ formatting

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

/** Bytes in binary units, as lorafit.base.units.format_bytes prints them (GiB = 2^30; the largest unit
 * that shows at least 1, moving up when rounding would show 1024). */
function fmtBytes(n, digits = 2) {
  if (n === null || n === undefined || !isFinite(n)) return "—";
  let i = 0;
  const shown = (k) => Number((Math.abs(n) / 1024 ** k).toFixed(k === 0 ? 0 : digits));
  while (i < UNITS.length - 1 && shown(i) >= 1024) i += 1;
  return i === 0 ? `${n.toFixed(0)} B` : `${(n / 1024 ** i).toFixed(digits)} ${UNITS[i]}`;
}

function fmtNum(n, digits = 3) {
  if (n === null || n === undefined || !isFinite(n)) return "—";
  if (Math.abs(n) >= 1000) return Math.round(n).toLocaleString("en-US");
  return Number(n.toPrecision(digits)).toString();
}

const fmt = {
  bytes: (n) => fmtBytes(n),
  tps: (n) => (n === null || n === undefined ? "—" : `${n.toFixed(n >= 100 ? 0 : 1)} tok/s`),
  mfu: (n) => (n === null || n === undefined ? "—" : `${(n * 100).toFixed(1)}%`),
  jpt: (n) => (n === null || n === undefined ? "—" : `${fmtNum(n)} J/tok`),
  loss: (n) => (n === null || n === undefined ? "—" : n.toFixed(4)),
  ppl: (n) => (n === null || n === undefined ? "—" : n.toFixed(2)),
  int: (n) => (n === null || n === undefined ? "—" : Math.round(n).toLocaleString("en-US")),
  seconds: (n) => (n === null || n === undefined ? "—" : n < 60 ? `${n.toFixed(2)} s` : `${(n / 60).toFixed(1)} min`),
  time: (t) => {
    if (!t) return "—";
    const d = new Date(t * 1000);
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
  },
  text: (v) => (v === null || v === undefined || v === "" ? "—" : String(v)),
};

// ------------------------------------------------------------------ DOM

/** h("tag.class", {attr: value, onclick: fn}, child, ...): an element; strings become text nodes. */
function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag);
  if (classes.length) el.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "testid") el.dataset.testid = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A trusted SVG string from this server (a matplotlib chart) as a node. */
function svgNode(markup) {
  const box = h("div.svg-chart");
  box.innerHTML = markup;
  for (const s of box.querySelectorAll("script")) s.remove();
  return box;
}

function badge(status) {
  return h(`span.badge.status-${status || "unknown"}`, { testid: "status", text: status || "unknown" });
}

function section(title, ...children) {
  return h("section.card", {}, h("h2", { text: title }), ...children);
}

function note(text, testid) {
  return h("p.note", { testid, text });
}

/** The message of a page with nothing to show: a title, then text in which every second piece is code. */
function emptyState(testid, title, ...pieces) {
  const parts = pieces.map((t, i) => (i % 2 ? h("code", { text: t }) : t));
  return h("div.empty-state", { testid }, h("p", { text: title }), h("p", {}, ...parts));
}

function errorBox(err, testid = "error") {
  return h(
    "div.alert.alert-error",
    { testid, role: "alert" },
    h("strong", { text: "Error: " }),
    err.message || String(err),
  );
}

/** A plain table from the server's {head, body} (cells are strings, shown verbatim). */
function serverTable(t, testid) {
  if (!t || !t.head) return null;
  return h(
    "div.table-wrap",
    {},
    h(
      "table.data",
      { testid },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          t.head.map((c) => h("th", { text: c })),
        ),
      ),
      h(
        "tbody",
        {},
        t.body.map((row) =>
          h(
            "tr",
            {},
            row.map((c) => h("td", { text: c })),
          ),
        ),
      ),
    ),
  );
}

function kvTable(pairs, testid) {
  return h(
    "table.kv",
    { testid },
    h(
      "tbody",
      {},
      pairs
        .filter(([, v]) => v !== undefined)
        .map(([k, v]) =>
          h("tr", { "data-key": k }, h("th", { text: k }), h("td", {}, v instanceof Node ? v : fmt.text(v))),
        ),
    ),
  );
}

function copyButton(getText, testid) {
  const b = h("button.small", { type: "button", testid, text: "Copy" });
  b.addEventListener("click", async () => {
    const text = getText();
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      // no clipboard permission (plain http on a non-loopback host): select the text for the user instead
      const ta = h("textarea", {}, text);
      document.body.append(ta);
      ta.select();
      document.execCommand("copy");
      ta.remove();
    }
    b.textContent = "Copied";
    setTimeout(() => (b.textContent = "Copy"), 1500);
  });
  return b;
}

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, message, type, field) {
    super(message);
    this.status = status;
    this.type = type;
    this.field = field; // the form field a 422 names
  }
}

/** fetch JSON from the API; a 401 shows the key form and retries once the key is accepted. */
async function api(path, body) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (res.status === 401) {
    await askForKey();
    return api(path, body);
  }
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  if (!res.ok) {
    const e = (data && data.error) || {};
    const detail = data && data.detail ? JSON.stringify(data.detail) : res.statusText;
    throw new ApiError(res.status, e.message || detail || `HTTP ${res.status}`, e.type, e.field);
  }
  return data;
}

let keyWaiters = null;

/** Show the API key form; resolves when POST /api/login accepted a key. */
function askForKey() {
  if (keyWaiters) return new Promise((resolve) => keyWaiters.push(resolve));
  keyWaiters = [];
  const overlay = document.getElementById("login");
  const form = overlay.querySelector("form");
  const input = form.querySelector("input");
  const error = form.querySelector(".error");
  overlay.hidden = false;
  input.value = "";
  input.focus();
  return new Promise((resolve) => {
    keyWaiters.push(resolve);
    form.onsubmit = async (ev) => {
      ev.preventDefault();
      error.hidden = true;
      const res = await fetch("/api/login", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ key: input.value }),
      });
      if (!res.ok) {
        error.textContent =
          res.status === 401 || res.status === 403 ? "That key is not right." : `Login failed (HTTP ${res.status}).`;
        error.hidden = false;
        return;
      }
      overlay.hidden = true;
      const waiters = keyWaiters;
      keyWaiters = null;
      waiters.forEach((w) => w());
    };
  });
}

// ------------------------------------------------------------------ router

const state = {
  selected: new Set(), // run ids ticked on the Runs page, kept across pages
  runsView: { sort: "created", dir: -1, filter: "", method: "", status: "" },
  cleanup: [], // what the current page must stop when the route changes (streams, timers, charts)
};

const ROUTES = [
  [/^#\/runs$/, () => pageRuns()],
  [/^#\/run\/([^/]+)$/, (m) => pageRun(decodeURIComponent(m[1]))],
  [/^#\/compare\/(.+)$/, (m) => pageCompare(m[1].split(",").map(decodeURIComponent).filter(Boolean))],
  [/^#\/sweeps$/, () => pageSweeps()],
  [/^#\/sweep\/(.+)$/, (m) => pageSweep(decodeURIComponent(m[1]))],
  [/^#\/fit$/, () => pageFit()],
  [/^#\/train$/, () => pageTrain()],
];

function onCleanup(fn) {
  state.cleanup.push(fn);
}

async function route() {
  const hash = location.hash || "#/runs";
  for (const fn of state.cleanup.splice(0)) {
    try {
      fn();
    } catch (e) {
      console.warn(e);
    }
  }
  const top = hash.split("/")[1] || "runs";
  for (const a of document.querySelectorAll("nav a")) {
    const active =
      a.dataset.route === top ||
      (a.dataset.route === "runs" && ["run", "compare"].includes(top)) ||
      (a.dataset.route === "sweeps" && top === "sweep");
    a.classList.toggle("active", active);
  }
  const app = document.getElementById("app");
  const hit = ROUTES.map(([re, fn]) => [hash.match(re), fn]).find(([m]) => m);
  const token = Symbol("page");
  state.page = token;
  app.replaceChildren(h("p.loading", { testid: "loading", text: "Loading…" }));
  app.dataset.page = top;
  try {
    const node = hit ? await hit[1](hit[0]) : notFound(hash);
    if (state.page === token) app.replaceChildren(node);
  } catch (e) {
    if (state.page === token)
      app.replaceChildren(errorBox(e, "page-error"), h("p", {}, h("a", { href: "#/runs", text: "Back to the runs" })));
  }
}

function notFound(hash) {
  return section(
    "Not found",
    h("p", { text: `No page at ${hash}.` }),
    h("a", { href: "#/runs", text: "Back to the runs" }),
  );
}

// ------------------------------------------------------------------ Runs

const RUN_COLUMNS = [
  {
    key: "label",
    title: "Run",
    show: (r) => h("a", { href: `#/run/${encodeURIComponent(r.id)}`, text: r.label || r.id }),
  },
  { key: "group", title: "Group", show: (r) => fmt.text(r.group) },
  { key: "method", title: "Method", show: (r) => fmt.text(r.method) },
  { key: "model", title: "Model", show: (r) => fmt.text(r.model) },
  { key: "status", title: "Status", show: (r) => badge(r.status) },
  { key: "tokens_per_s", title: "Tokens/s", num: true, show: (r) => fmt.tps(r.tokens_per_s) },
  { key: "peak_memory_bytes", title: "Peak memory", num: true, show: (r) => fmt.bytes(r.peak_memory_bytes) },
  { key: "mfu", title: "MFU", num: true, show: (r) => fmt.mfu(r.mfu) },
  { key: "joules_per_token", title: "J/token", num: true, show: (r) => fmt.jpt(r.joules_per_token) },
  { key: "loss", title: "Loss", num: true, show: (r) => fmt.loss(r.loss) },
  { key: "perplexity", title: "Perplexity", num: true, show: (r) => fmt.ppl(r.perplexity) },
  { key: "created", title: "Created", num: true, show: (r) => fmt.time(r.created) },
];

function showSources(sources) {
  const el = document.querySelector("[data-testid=sources]");
  if (!sources) return;
  const parts = [];
  if (sources.store) parts.push(`store ${sources.store}`);
  if (sources.roots && sources.roots.length) parts.push(`runs ${sources.roots.join(", ")}`);
  el.textContent = parts.join(" · ");
  el.title = el.textContent;
}

function problemsBox(problems) {
  if (!problems || !problems.length) return null;
  return h(
    "div.alert.alert-warn",
    { testid: "problems", role: "alert" },
    h("strong", { text: `${problems.length} problem${problems.length > 1 ? "s" : ""} reading the runs` }),
    h(
      "ul",
      {},
      problems.map((p) => h("li", { testid: "problem" }, h("code", { text: p.source }), ": ", p.message)),
    ),
  );
}

function compareValue(a, b) {
  if (a === null || a === undefined) return b === null || b === undefined ? 0 : 1; // missing sorts last
  if (b === null || b === undefined) return -1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}

function visibleRuns(runs) {
  const v = state.runsView;
  const words = v.filter.toLowerCase().split(/\s+/).filter(Boolean);
  const rows = runs.filter((r) => {
    if (v.method && r.method !== v.method) return false;
    if (v.status && r.status !== v.status) return false;
    const text = [r.label, r.method, r.model, r.status, r.group, r.run_dir, r.id].join(" ").toLowerCase();
    return words.every((w) => text.includes(w));
  });
  rows.sort((a, b) => {
    const c = compareValue(a[v.sort], b[v.sort]);
    return a[v.sort] === null || a[v.sort] === undefined || b[v.sort] === null || b[v.sort] === undefined
      ? c
      : c * v.dir;
  });
  return rows;
}

function optionsOf(runs, key) {
  return [...new Set(runs.map((r) => r[key]).filter(Boolean))].sort();
}

function selectBox(testid, label, values, current, onchange) {
  return h(
    "label.inline",
    {},
    `${label} `,
    h(
      "select",
      { testid, onchange: (e) => onchange(e.target.value) },
      h("option", { value: "", text: "all" }),
      values.map((v) => h("option", { value: v, text: v, selected: v === current })),
    ),
  );
}

async function pageRuns() {
  const data = await api("/api/runs");
  showSources(data.sources);
  const runs = data.runs;
  const v = state.runsView;
  const known = new Set(runs.map((r) => r.id));
  for (const id of [...state.selected]) if (!known.has(id)) state.selected.delete(id);

  const tbody = h("tbody");
  const count = h("span.muted", { testid: "runs-count" });
  const compareBtn = h("button.primary", {
    type: "button",
    testid: "compare-button",
    onclick: () => (location.hash = `#/compare/${[...state.selected].map(encodeURIComponent).join(",")}`),
  });
  const headRow = h("tr");

  function updateCompare() {
    compareBtn.disabled = state.selected.size < 1;
    compareBtn.textContent = state.selected.size ? `Compare ${state.selected.size} selected` : "Compare";
  }

  function renderHead() {
    headRow.replaceChildren(
      h("th.select", {}, ""),
      ...RUN_COLUMNS.map((c) =>
        h(
          `th.sortable${c.num ? ".num" : ""}`,
          {
            testid: `sort-${c.key}`,
            "aria-sort": v.sort === c.key ? (v.dir > 0 ? "ascending" : "descending") : "none",
            tabindex: "0",
            onkeydown: (e) => (e.key === "Enter" || e.key === " ") && (e.preventDefault(), e.target.click()),
            onclick: () => {
              v.dir = v.sort === c.key ? -v.dir : c.num ? -1 : 1;
              v.sort = c.key;
              renderHead();
              renderBody();
            },
          },
          c.title,
          h("span.arrow", { text: v.sort === c.key ? (v.dir > 0 ? " ▲" : " ▼") : "" }),
        ),
      ),
    );
  }

  function renderBody() {
    const rows = visibleRuns(runs);
    count.textContent = `${rows.length} of ${runs.length} runs`;
    tbody.replaceChildren(
      ...rows.map((r) => {
        const box = h("input", {
          type: "checkbox",
          testid: "select-run",
          "aria-label": `select ${r.label}`,
          checked: state.selected.has(r.id),
          onchange: (e) => {
            if (e.target.checked) state.selected.add(r.id);
            else state.selected.delete(r.id);
            updateCompare();
          },
        });
        return h(
          "tr",
          { testid: "run-row", "data-id": r.id, "data-status": r.status, "data-method": r.method || "" },
          h("td.select", {}, box),
          RUN_COLUMNS.map((c) => h(`td${c.num ? ".num" : ""}`, { "data-col": c.key }, c.show(r))),
        );
      }),
    );
    if (!rows.length)
      tbody.append(h("tr", {}, h("td.empty", { colspan: RUN_COLUMNS.length + 1, text: "No run matches the filter." })));
  }

  renderHead();
  renderBody();
  updateCompare();

  const filter = h("input", {
    type: "search",
    testid: "filter",
    placeholder: "Filter: label, model, group, path…",
    value: v.filter,
    oninput: (e) => {
      v.filter = e.target.value;
      renderBody();
    },
  });
  const controls = h(
    "div.controls",
    {},
    filter,
    selectBox("filter-method", "Method", optionsOf(runs, "method"), v.method, (x) => ((v.method = x), renderBody())),
    selectBox("filter-status", "Status", optionsOf(runs, "status"), v.status, (x) => ((v.status = x), renderBody())),
    count,
    h("span.spacer"),
    compareBtn,
  );

  // while some run is training, refresh the rows (the filter, sort and selection stay)
  if (runs.some((r) => r.status === "running")) {
    const timer = setInterval(async () => {
      try {
        const fresh = await api("/api/runs");
        runs.splice(0, runs.length, ...fresh.runs);
        renderBody();
      } catch (e) {
        console.warn(e);
      }
    }, 5000);
    onCleanup(() => clearInterval(timer));
  }

  const body = runs.length
    ? h("div.table-wrap", {}, h("table.data.runs", { testid: "runs-table" }, h("thead", {}, headRow), tbody))
    : emptyState(
        "empty-runs",
        "No runs yet.",
        "Train one with ",
        "lorafit train --model random:tiny --out runs/first",
        " and start ",
        "lorafit ui --runs runs",
        ", or point ",
        "--store",
        " at a run store written by lorafit compare or sweep.",
      );
  return h(
    "div",
    { testid: "page-runs" },
    h("div.page-head", {}, h("h1", { text: "Runs" })),
    problemsBox(data.problems),
    runs.length ? controls : null,
    body,
  );
}

// ------------------------------------------------------------------ Run

const CHARTS = [
  { key: "loss", title: "Loss", value: (r) => r.loss, axis: (v) => fmtNum(v, 3), color: "#2f6fdb" },
  { key: "tokens_per_s", title: "Tokens/s", value: (r) => r.tokens_per_s, axis: (v) => fmtNum(v, 3), color: "#1a9a6c" },
  { key: "memory", title: "Memory", value: (r) => r.memory_bytes, axis: (v) => fmtBytes(v, 1), color: "#c2571a" },
];

/** One uPlot line chart over steps; add(rows) appends points and redraws without a reload. */
function lineChart(spec) {
  const box = h("div.chart", { testid: `chart-${spec.key}`, "data-points": "0" });
  const fig = h("figure.chart-card", {}, h("figcaption", { text: spec.title }), box);
  const xs = [];
  const ys = [];
  let plot = null;
  const width = () => Math.max(260, box.clientWidth || 320);
  function draw() {
    if (!plot && box.isConnected) {
      plot = new uPlot(
        {
          width: width(),
          height: 200,
          legend: { show: false },
          cursor: { drag: { x: false, y: false } },
          scales: { x: { time: false } },
          axes: [
            { label: "step", size: 36, values: (u, vals) => vals.map((v) => (Number.isInteger(v) ? String(v) : "")) },
            { size: 70, values: (u, vals) => vals.map(spec.axis) },
          ],
          series: [
            { label: "step" },
            {
              label: spec.title,
              stroke: spec.color,
              width: 2,
              fill: `${spec.color}18`,
              points: { show: xs.length < 60, size: 5 },
            },
          ],
        },
        [xs, ys],
        box,
      );
      const ro = new ResizeObserver(() => plot && plot.setSize({ width: width(), height: 200 }));
      ro.observe(box);
      onCleanup(() => {
        ro.disconnect();
        plot.destroy();
      });
    } else if (plot) {
      plot.setData([xs, ys]);
    }
  }
  return {
    node: fig,
    add(rows) {
      for (const r of rows) {
        const y = spec.value(r);
        if (typeof y !== "number") continue;
        xs.push(r.step);
        ys.push(y);
      }
      box.dataset.points = String(xs.length);
      const last = ys.length ? ys[ys.length - 1] : null;
      fig.querySelector("figcaption").textContent = last === null ? spec.title : `${spec.title}: ${spec.axis(last)}`;
      draw();
    },
    draw,
  };
}

/** Metrics rows of a run as they are written: SSE first, polling /metrics?after= when the stream fails. */
function followMetrics(id, lastStep, onRows, onStatus, onDone, liveLabel) {
  let last = lastStep;
  let stopped = false;
  let es = null;
  let timer = null;
  const take = (rows) => {
    const fresh = rows.filter((r) => typeof r.step === "number" && r.step > last);
    if (fresh.length) {
      last = fresh[fresh.length - 1].step;
      onRows(fresh);
    }
  };
  const finish = () => {
    if (stopped) return;
    stopped = true;
    if (es) es.close();
    clearTimeout(timer);
    onDone();
  };
  const poll = async () => {
    if (stopped) return;
    try {
      const data = await api(`/api/runs/${encodeURIComponent(id)}/metrics?after=${last}`);
      take(data.rows);
      onStatus(data.status);
      if (data.done) return finish();
    } catch (e) {
      console.warn(e);
    }
    timer = setTimeout(poll, 1000);
  };
  const startPolling = () => {
    liveLabel("live (polling)");
    poll();
  };
  if (window.EventSource) {
    es = new EventSource(`/api/runs/${encodeURIComponent(id)}/events`);
    liveLabel("live (streaming)");
    es.addEventListener("metrics", (ev) => take([JSON.parse(ev.data)]));
    es.addEventListener("status", (ev) => onStatus(JSON.parse(ev.data).status));
    es.addEventListener("done", finish);
    es.onerror = () => {
      if (stopped) return;
      es.close();
      es = null;
      startPolling();
    };
  } else startPolling();
  return () => {
    stopped = true;
    if (es) es.close();
    clearTimeout(timer);
  };
}

/** A stacked horizontal bar of memory parts (inline SVG) with a legend of exact sizes. */
const PART_COLORS = ["#8a94a6", "#2f6fdb", "#1a9a6c", "#e0a21b", "#c2571a", "#8c4bd1", "#d14b7d", "#3aa6b9"];

function memoryBar(parts, testid, peakBytes) {
  const shown = parts.filter((p) => p.bytes > 0);
  const total = shown.reduce((s, p) => s + p.bytes, 0);
  const wrap = h("div.membar", { testid, "data-total": String(total) });
  if (!total) {
    wrap.append(note("No memory breakdown recorded for this run."));
    return wrap;
  }
  const scale = Math.max(total, peakBytes || 0);
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 1000 36");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `memory breakdown, total ${fmtBytes(total)}`);
  let x = 0;
  shown.forEach((p, i) => {
    const w = (p.bytes / scale) * 1000;
    const rect = document.createElementNS(NS, "rect");
    for (const [k, val] of Object.entries({
      x,
      y: 0,
      width: Math.max(w, 0.5),
      height: 36,
      fill: PART_COLORS[i % PART_COLORS.length],
    }))
      rect.setAttribute(k, val);
    const tip = document.createElementNS(NS, "title");
    tip.textContent = `${p.part}: ${fmtBytes(p.bytes)} (${((p.bytes / total) * 100).toFixed(1)}%)`;
    rect.append(tip);
    svg.append(rect);
    x += w;
  });
  if (peakBytes && peakBytes > 0) {
    const px = (peakBytes / scale) * 1000;
    const line = document.createElementNS(NS, "line");
    for (const [k, val] of Object.entries({
      x1: px,
      x2: px,
      y1: 0,
      y2: 36,
      stroke: "#111",
      "stroke-width": 3,
      "stroke-dasharray": "4 3",
    }))
      line.setAttribute(k, val);
    svg.append(line);
  }
  wrap.append(svg);
  wrap.append(
    h(
      "ul.legend",
      {},
      shown.map((p, i) =>
        h(
          "li",
          { testid: "memory-part", "data-part": p.part, "data-bytes": String(p.bytes) },
          h("span.swatch", { style: `background:${PART_COLORS[i % PART_COLORS.length]}` }),
          h("span.part", { text: p.part }),
          h("span.value", { text: `${fmtBytes(p.bytes)} · ${((p.bytes / total) * 100).toFixed(1)}%` }),
        ),
      ),
      h("li.total", {}, h("span.part", { text: "total" }), h("span.value", { text: fmtBytes(total) })),
      peakBytes
        ? h(
            "li.total",
            {},
            h("span.part", { text: "measured peak (dashed)" }),
            h("span.value", { text: fmtBytes(peakBytes) }),
          )
        : null,
    ),
  );
  return wrap;
}

function summaryPairs(s) {
  const pm = s.peak_memory || {};
  const loss =
    s.loss_first !== undefined
      ? `${fmt.loss(s.loss_first)} → ${fmt.loss(s.loss_last)} (mean ${fmt.loss(s.loss_mean)})`
      : undefined;
  return [
    ["status", badge(s.status)],
    ["model", s.model],
    ["method", s.method],
    ["precision", s.precision],
    ["optimizer", s.optimizer],
    ["steps", s.steps !== undefined ? `${fmt.int(s.steps)} (${fmt.int(s.timed_steps)} timed)` : undefined],
    ["tokens/s", s.tokens_per_s !== undefined ? fmt.tps(s.tokens_per_s) : undefined],
    [
      "step time",
      s.step_time_s ? `mean ${fmt.seconds(s.step_time_s.mean)}, p50 ${fmt.seconds(s.step_time_s.p50)}` : undefined,
    ],
    ["peak memory", pm.peak_bytes !== undefined ? `${fmtBytes(pm.peak_bytes)} (${pm.kind || "?"})` : undefined],
    ["MFU", s.mfu !== undefined ? fmt.mfu(s.mfu) : undefined],
    [
      "energy",
      s.j_per_token !== undefined
        ? s.j_per_token === null
          ? `n/a (${s.energy_unavailable_reason || "not measured"})`
          : `${fmt.jpt(s.j_per_token)}, ${fmtNum(s.energy_j)} J`
        : undefined,
    ],
    ["loss", loss],
    [
      "trainable",
      s.trainable_params !== undefined
        ? `${fmt.int(s.trainable_params)} of ${fmt.int(s.total_params)} (${fmtNum(s.trainable_pct)}%)`
        : undefined,
    ],
    ["tokens", s.tokens !== undefined ? fmt.int(s.tokens) : undefined],
    ["wall time", s.wall_s !== undefined ? fmt.seconds(s.wall_s) : undefined],
    ["error", s.error],
  ];
}

function settingsTable(config) {
  const keys = Object.keys(config || {});
  if (!keys.length) return note("No config.yaml for this run.");
  const show = (v) =>
    Array.isArray(v) ? v.join(", ") : v !== null && typeof v === "object" ? JSON.stringify(v) : fmt.text(v);
  return h(
    "div.settings-grid",
    {},
    kvTable(
      keys.map((k) => [k, show(config[k])]),
      "settings",
    ),
  );
}

function evalPairs(e) {
  const p = e.perplexity || {};
  const g = e.generation || {};
  const size = e.size || {};
  return [
    [
      "perplexity",
      p.ppl !== undefined ? `${fmt.ppl(p.ppl)} on ${p.text || "?"} (${fmt.int(p.tokens_scored)} tokens)` : undefined,
    ],
    [
      "generation",
      g.decode_tokens_per_s !== undefined
        ? `${fmt.tps(g.decode_tokens_per_s)}, first token ${fmt.seconds(g.ttft_s)}`
        : undefined,
    ],
    ["size on disk", size.disk_bytes !== undefined ? fmtBytes(size.disk_bytes) : undefined],
    ["adapter on disk", size.disk_adapter_bytes ? fmtBytes(size.disk_adapter_bytes) : undefined],
  ];
}

async function pageRun(id) {
  const data = await api(`/api/runs/${encodeURIComponent(id)}`);
  const run = data.run;
  const statusSlot = h("span", {}, badge(run.status));
  const live = h("span.live", { testid: "live-state" });
  const details = h("div", { testid: "run-details" });
  const charts = CHARTS.map(lineChart);
  const steps = h("span.muted", { testid: "steps-count" });
  let count = 0;
  const addRows = (rows) => {
    charts.forEach((c) => c.add(rows));
    count += rows.filter((r) => typeof r.loss === "number").length;
    steps.textContent = `${count} step${count === 1 ? "" : "s"} logged`;
  };

  function renderDetails(d) {
    const parts = [];
    if (d.summary) parts.push(section("Summary", kvTable(summaryPairs(d.summary), "summary")));
    else
      parts.push(
        section(
          "Summary",
          note(
            run.status === "running"
              ? "Training: the summary appears when the run ends."
              : "No summary.json: the run did not finish.",
            "no-summary",
          ),
        ),
      );
    const peak = d.summary && d.summary.peak_memory ? d.summary.peak_memory.peak_bytes : null;
    parts.push(section("Memory breakdown", memoryBar(d.memory_breakdown || [], "memory-bar", peak)));
    if (d.eval) parts.push(section("Evaluation", kvTable(evalPairs(d.eval), "eval")));
    const where = d.adapter || (d.run && d.run.run_dir);
    parts.push(
      section(
        "Where it is",
        kvTable(
          [
            [
              "adapter",
              d.adapter
                ? h(
                    "span",
                    {},
                    h("code", { testid: "adapter-path", text: d.adapter }),
                    " ",
                    copyButton(() => d.adapter, "copy-adapter"),
                  )
                : "none saved",
            ],
            ["run directory", d.run.run_dir ? h("code", { testid: "run-dir", text: d.run.run_dir }) : "—"],
            ["group", d.run.group],
            ["id", h("code", { text: d.run.id })],
          ],
          "where",
        ),
        where && d.adapter
          ? h("p.muted", {}, "Serve it: ", h("code", { text: `lorafit serve --adapter ${d.adapter}` }))
          : null,
      ),
    );
    if (d.plan)
      parts.push(
        section(
          "Memory plan",
          kvTable(
            Object.entries(d.plan).map(([k, v]) => [k, typeof v === "object" && v !== null ? JSON.stringify(v) : v]),
            "plan",
          ),
        ),
      );
    parts.push(section("Settings", settingsTable(d.config)));
    const [summary, ...side] = parts.slice(0, -1);
    details.replaceChildren(
      h("div.two-col", {}, h("div", {}, summary), h("div", {}, ...side)),
      parts[parts.length - 1],
    );
  }

  renderDetails(data);
  const lastStep = data.metrics.reduce((m, r) => (typeof r.step === "number" && r.step > m ? r.step : m), 0);
  const page = h(
    "div",
    { testid: "page-run", "data-id": run.id },
    h(
      "div.page-head",
      {},
      h("h1", {}, run.label || run.id, " ", statusSlot),
      h("span.muted", { text: [run.method, run.model, run.group].filter(Boolean).join(" · ") }),
    ),
    h(
      "section.card",
      {},
      h("div.card-head", {}, h("h2", { text: "Training curves" }), steps, live),
      h(
        "div.charts",
        {},
        charts.map((c) => c.node),
      ),
    ),
    details,
  );
  // uPlot needs the boxes in the document to size them: draw once the page is shown
  setTimeout(() => {
    if (!page.isConnected) return; // the route changed before the page was shown
    addRows(data.metrics);
    if (run.status === "running") {
      const stop = followMetrics(
        run.id,
        lastStep,
        addRows,
        (s) => statusSlot.replaceChildren(badge(s)),
        async () => {
          live.textContent = "finished";
          try {
            const fresh = await api(`/api/runs/${encodeURIComponent(run.id)}`);
            statusSlot.replaceChildren(badge(fresh.run.status));
            renderDetails(fresh);
          } catch (e) {
            details.prepend(errorBox(e));
          }
        },
        (label) => (live.textContent = label),
      );
      onCleanup(stop);
    } else {
      live.textContent = "";
    }
  }, 0);
  return page;
}

// ------------------------------------------------------------------ Compare

function chartsGrid(charts, titles, prefix) {
  const names = Object.keys(charts || {});
  if (!names.length) return null;
  return h(
    "div.svg-grid",
    {},
    names.map((n) =>
      h(
        "figure.chart-card",
        { testid: `${prefix}-${n}` },
        h("figcaption", { text: (titles && titles[n]) || n }),
        svgNode(charts[n]),
      ),
    ),
  );
}

async function pageCompare(ids) {
  const all = await api("/api/runs");
  const byId = new Map(all.runs.map((r) => [r.id, r]));
  const missing = ids.filter((i) => !byId.has(i));
  const out = h("div", { testid: "compare-result" });
  const baseline = h(
    "select",
    { testid: "baseline", onchange: () => load() },
    h("option", { value: "", text: "first training run (default)" }),
  );
  const fillBaseline = (labels) => {
    // the report's labels (method, or method and directory when two runs share one) name the baseline
    if (baseline.options.length > 1) return;
    for (const l of [...new Set(labels)]) baseline.append(h("option", { value: l, text: l }));
  };
  const reportOut = h("span", { testid: "report-result" });
  const writeBtn = h("button", {
    type: "button",
    testid: "write-report",
    text: "Write HTML report",
    onclick: async () => {
      writeBtn.disabled = true;
      reportOut.replaceChildren("Writing…");
      try {
        const r = await api("/api/compare/report", { ids, baseline: baseline.value || null });
        reportOut.replaceChildren(
          "Written to ",
          h("code", { testid: "report-path", text: r.path }),
          " · ",
          h("a", { href: r.url, target: "_blank", rel: "noopener", testid: "report-link", text: "open it" }),
        );
      } catch (e) {
        reportOut.replaceChildren(errorBox(e, "report-error"));
      } finally {
        writeBtn.disabled = false;
      }
    },
  });

  let asked = 0; // only the answer to the latest baseline is shown
  async function load() {
    const mine = ++asked;
    out.replaceChildren(h("p.loading", { text: "Building the comparison…" }));
    try {
      const c = await api("/api/compare", { ids, baseline: baseline.value || null });
      if (mine !== asked) return;
      fillBaseline(c.labels || []);
      out.replaceChildren(
        section(
          "Comparison",
          serverTable(c.table, "compare-table"),
          c.notes && c.notes.length
            ? h(
                "details.notes",
                {},
                h("summary", { text: `Notes (${c.notes.length})` }),
                c.notes.map((n) => note(n, "compare-note")),
              )
            : null,
        ),
        section(
          "Against the baseline",
          serverTable(c.improvement, "improvement-table"),
          c.improvement && c.improvement.note ? note(c.improvement.note) : null,
        ),
        section("Charts", chartsGrid(c.charts, c.titles, "compare-chart") || note("No charts for these runs.")),
        section("Peak memory breakdown", serverTable(c.breakdown, "breakdown-table")),
        section(
          "Settings that differ",
          serverTable(c.settings, "settings-table"),
          c.settings && c.settings.note ? note(c.settings.note) : null,
        ),
      );
    } catch (e) {
      if (mine === asked) out.replaceChildren(errorBox(e, "compare-error"));
    }
  }
  load(); // the shell shows at once; the charts take the server a few seconds to draw
  return h(
    "div",
    { testid: "page-compare" },
    h(
      "div.page-head",
      {},
      h("h1", { text: `Compare ${ids.length} runs` }),
      h("a", { href: "#/runs", text: "← change the selection" }),
    ),
    missing.length
      ? h("div.alert.alert-warn", { testid: "missing-runs" }, `Unknown run ids: ${missing.join(", ")}`)
      : null,
    h("div.controls", {}, h("label.inline", {}, "Baseline ", baseline), h("span.spacer"), writeBtn, reportOut),
    out,
  );
}

// ------------------------------------------------------------------ Sweeps

async function pageSweeps() {
  const data = await api("/api/sweeps");
  if (!data.sweeps.length) {
    return h(
      "div",
      { testid: "page-sweeps" },
      h("div.page-head", {}, h("h1", { text: "Sweeps" })),
      emptyState(
        "empty-sweeps",
        "No sweeps in the store.",
        "Run one with ",
        "lorafit sweep examples/sweeps/cpu-smollm2.yaml --store runs.sqlite",
        " and start ",
        "lorafit ui --store runs.sqlite",
        ".",
      ),
    );
  }
  const rows = data.sweeps.map((s) =>
    h(
      "tr",
      { testid: "sweep-row", "data-name": s.name },
      h("td", {}, h("a", { href: `#/sweep/${encodeURIComponent(s.name)}`, text: s.name })),
      h("td.num", { text: String(s.points) }),
      h("td.num", { text: String(s.ok) }),
      h("td.num", {}, s.oom ? h("span.badge.status-oom", { text: String(s.oom) }) : "0"),
      h("td.num", {}, s.failed ? h("span.badge.status-failed", { text: String(s.failed) }) : "0"),
      h("td.num", { text: fmt.time(s.created) }),
    ),
  );
  return h(
    "div",
    { testid: "page-sweeps" },
    h("div.page-head", {}, h("h1", { text: "Sweeps" })),
    h(
      "div.table-wrap",
      {},
      h(
        "table.data",
        { testid: "sweeps-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["Sweep", "Points", "OK", "OOM", "Failed", "Created"].map((t, i) => h(i ? "th.num" : "th", { text: t })),
          ),
        ),
        h("tbody", {}, rows),
      ),
    ),
  );
}

function settingsText(settings) {
  return Object.entries(settings || {})
    .map(([k, v]) => `${k}=${v}`)
    .join(" ");
}

async function pageSweep(name) {
  const s = await api(`/api/sweeps/${encodeURIComponent(name)}`);
  const best = s.best;
  const bestBox = h(
    "div.best",
    { testid: "best-point" },
    best
      ? [
          h(
            "div.best-label",
            {},
            "Best within ",
            s.budget_bytes ? fmtBytes(s.budget_bytes) : "the sweep",
            ": ",
            h("a", { href: `#/run/${encodeURIComponent(best.id)}`, text: best.point || best.label }),
          ),
          h("div.muted", { text: `${fmt.tps(best.tokens_per_s)} · peak ${fmt.bytes(best.peak_memory_bytes)}` }),
        ]
      : h("div", { text: "No point finished within the budget." }),
  );
  const pointRows = s.points.map((p) =>
    h(
      `tr${p.status === "oom" ? ".row-oom" : ""}${p.pareto ? ".row-pareto" : ""}`,
      { testid: "sweep-point", "data-status": p.status, "data-pareto": String(!!p.pareto), "data-id": p.id },
      h(
        "td",
        {},
        h("a", { href: `#/run/${encodeURIComponent(p.id)}`, text: p.point || settingsText(p.settings) || p.label }),
      ),
      h("td", {}, badge(p.status)),
      h("td.num", { text: fmt.tps(p.tokens_per_s) }),
      h("td.num", { text: fmt.bytes(p.peak_memory_bytes) }),
      h("td.num", { text: fmt.mfu(p.mfu) }),
      h("td.num", { text: fmt.jpt(p.joules_per_token) }),
      h("td", {}, p.pareto ? h("span.badge.pareto", { text: "Pareto front" }) : ""),
      h("td", {}, best && best.id === p.id ? h("span.badge.best-badge", { text: "best" }) : ""),
    ),
  );
  const front = s.points.filter((p) => p.pareto);
  return h(
    "div",
    { testid: "page-sweep", "data-name": s.name },
    h("div.page-head", {}, h("h1", { text: `Sweep ${s.name}` }), h("a", { href: "#/sweeps", text: "← all sweeps" })),
    h(
      "section.card.verdict",
      {},
      h("p", { testid: "verdict", text: s.verdict }),
      bestBox,
      s.budget_bytes ? h("p.muted", { testid: "budget", text: `memory budget ${fmtBytes(s.budget_bytes)}` }) : null,
    ),
    section(
      "Points",
      h(
        "div.table-wrap",
        {},
        h(
          "table.data",
          { testid: "sweep-points" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Point", "Status", "Tokens/s", "Peak memory", "MFU", "J/token", "", ""].map((t, i) =>
                h(i >= 2 && i <= 5 ? "th.num" : "th", { text: t }),
              ),
            ),
          ),
          h("tbody", {}, pointRows),
        ),
      ),
      h("p.muted", {
        testid: "pareto-summary",
        text: `${front.length} point${front.length === 1 ? "" : "s"} on the Pareto front (no other point is both faster and smaller); ${s.points.filter((p) => p.status === "oom").length} ran out of memory.`,
      }),
    ),
    section("Charts", chartsGrid(s.charts, s.titles, "sweep-chart") || note("No charts for this sweep.")),
    s.table
      ? h("details.card", {}, h("summary", { text: "The report's table" }), serverTable(s.table, "sweep-table"))
      : null,
  );
}

// ------------------------------------------------------------------ Will it fit?

/** Fields the fit and train forms share; `text(name, label, list, hint)` a typed one with suggestions. */
const FIELD = {
  method: { name: "method", label: "Method", kind: "select", options: "methods" },
  batch_size: { name: "batch_size", label: "Batch size", kind: "number", min: 1 },
  max_length: { name: "max_length", label: "Max length (tokens)", kind: "number", min: 1 },
  lora_r: { name: "lora_r", label: "LoRA rank", kind: "number", min: 1 },
  text: (name, label, list, hint) => ({ name, label, kind: "text", list, required: true, hint }),
};

const FIT_FIELDS = [
  FIELD.text("model", "Model", "models", "built in, random:<arch>, or a local model directory"),
  FIELD.method,
  FIELD.batch_size,
  FIELD.max_length,
  { name: "precision", label: "Precision", kind: "select", options: "precisions" },
  { name: "optimizer", label: "Optimizer", kind: "select", options: "optimizers" },
  FIELD.lora_r,
  { name: "device", label: "Device", kind: "select", options: "devices" },
  { name: "budget", label: "Memory budget", kind: "text", emptyNull: true, hint: "e.g. 8GB or 24GiB; empty: no budget" },
  { name: "gradient_checkpointing", label: "Gradient checkpointing", kind: "check" },
  { name: "packing", label: "Packing", kind: "check" },
];

const fitState = { values: null };

/** One labelled field of a form (the fit form, the train form): ids and testids are `${prefix}-${name}`.
 * A field with `list` offers the values of options[list] as suggestions and still takes any text. */
function formField(prefix, f, options, value) {
  const id = `${prefix}-${f.name}`;
  let input;
  if (f.kind === "select") {
    input = h(
      "select",
      { id, name: f.name },
      (options[f.options] || []).map((o) => h("option", { value: o, text: o, selected: String(o) === String(value) })),
    );
  } else if (f.kind === "check") {
    input = h("input", { id, name: f.name, type: "checkbox", checked: !!value });
    input.dataset.testid = id;
    return h("label.check", { "data-field": f.name }, input, ` ${f.label}`);
  } else {
    input = h("input", {
      id,
      name: f.name,
      type: f.kind,
      value: value ?? "",
      min: f.min,
      step: f.step,
      placeholder: f.placeholder || (f.list ? "" : f.hint || ""),
      list: f.list ? `${id}-list` : null,
      required: f.required,
      autocomplete: f.list ? "off" : null,
    });
  }
  input.dataset.testid = id;
  return h(
    "label.field",
    { "data-field": f.name },
    h("span", { text: f.label }),
    input,
    f.list
      ? h(
          "datalist",
          { id: `${id}-list` },
          (options[f.list] || []).map((o) => h("option", { value: o })),
        )
      : null,
    f.hint && f.list ? h("small.muted", { text: f.hint }) : null,
  );
}

/** A form's values by field: numbers as numbers, empty text and numbers as null, checkboxes as booleans. */
function readForm(form, fields) {
  const v = {};
  for (const f of fields) {
    const el = form.elements[f.name];
    if (f.kind === "check") v[f.name] = el.checked;
    else if (f.kind === "number") v[f.name] = el.value === "" ? null : Number(el.value);
    else v[f.name] = el.value.trim() || (f.emptyNull ? null : "");
  }
  return v;
}

/** Mark the field a 422 names (or clear every mark with no error) and show the error in `out`. */
function showFormError(form, e, out, testid) {
  const bad = e.field && form.querySelector(`[data-field="${e.field}"]`);
  if (bad) bad.classList.add("invalid");
  out.replaceChildren(errorBox(e, testid));
}

function clearInvalid(form) {
  for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
}

/** The fit and train forms: `fields` (ids `${prefix}-…`) and a submit button labelled `label`. Submitting
 * keeps the values in `memory.values`, shows `busy` in `out` and awaits `send(values)` with the button
 * disabled; an error is shown in `out`, and a 422 marks the field it names. */
function submitForm({ prefix, fields, choices, values, label, out, memory, busy, send }) {
  const submit = h("button.primary", { type: "submit", testid: `${prefix}-submit`, text: label });
  const form = h(
    "form.fit-form",
    { testid: `${prefix}-form` },
    h(
      "div.fields",
      {},
      fields.map((f) => formField(prefix, f, choices, values[f.name])),
    ),
    h("div.actions", {}, submit),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const asked = readForm(form, fields);
    memory.values = asked;
    clearInvalid(form);
    submit.disabled = true;
    out.replaceChildren(h("p.loading", { text: busy }));
    try {
      await send(asked);
    } catch (e) {
      showFormError(form, e, out, `${prefix}-error`);
    } finally {
      submit.disabled = false;
    }
  });
  return { form, submit };
}

function fitAnswer(r, asked) {
  const est = r.estimate;
  const parts = Object.entries(est.parts).map(([part, bytes]) => ({ part, bytes }));
  const verdict =
    r.fits === null || r.fits === undefined
      ? h(
          "div.verdict-box.neutral",
          { testid: "fit-verdict", "data-fits": "unknown" },
          `Needs about ${fmtBytes(est.total)}`,
          h("small", { text: " (give a budget to see whether it fits)" }),
        )
      : h(
          `div.verdict-box.${r.fits ? "ok" : "bad"}`,
          { testid: "fit-verdict", "data-fits": String(r.fits) },
          r.fits ? "Fits" : "Does not fit",
          h("small", { text: ` ${fmtBytes(est.total)} of ${fmtBytes(r.budget_bytes)} (${asked.budget})` }),
        );
  const limits = [];
  if (r.max_batch !== null && r.max_batch !== undefined)
    limits.push([
      "largest batch that fits",
      h("span", {
        testid: "fit-max-batch",
        "data-value": String(r.max_batch),
        text: `${r.max_batch} (at ${est.max_length} tokens)`,
      }),
    ]);
  if (r.max_length !== null && r.max_length !== undefined)
    limits.push([
      "longest length that fits",
      h("span", {
        testid: "fit-max-length",
        "data-value": String(r.max_length),
        text: `${r.max_length} tokens (at batch ${est.batch_size})`,
      }),
    ]);
  if (r.budget_bytes && !limits.length)
    limits.push(["largest batch / length", "nothing fits in this budget, even batch 1"]);
  return h(
    "div",
    { testid: "fit-answer" },
    verdict,
    h(
      "p.total",
      {},
      "Estimated peak: ",
      h("strong", { testid: "fit-total", "data-bytes": String(est.total), text: fmtBytes(est.total) }),
      h("span.muted", {
        text: ` · ${est.batch_size} × ${est.max_length} tokens, ${est.precision}, ${fmt.int(est.trainable_params)} trainable parameters`,
      }),
    ),
    memoryBar(parts, "fit-breakdown", null),
    limits.length ? kvTable(limits, "fit-limits") : null,
    h(
      "div.command",
      {},
      h("h3", { text: "Train it" }),
      h("pre", {}, h("code", { testid: "fit-command", text: r.command })),
      copyButton(() => r.command, "copy-command"),
    ),
    est.notes && est.notes.length
      ? h(
          "ul.notes",
          { testid: "fit-notes" },
          est.notes.map((n) => h("li", { text: n })),
        )
      : null,
  );
}

async function pageFit() {
  const options = await api("/api/fit/options");
  const values = fitState.values || {
    ...options.defaults,
    device: (options.defaults && options.defaults.device) || "cuda",
    budget: "",
  };
  if (!options.devices.includes(values.device)) values.device = options.devices[options.devices.length - 1];
  const answer = h("div", { testid: "fit-result" });
  const { form } = submitForm({
    prefix: "fit",
    fields: FIT_FIELDS,
    choices: options,
    values,
    label: "Will it fit?",
    out: answer,
    memory: fitState,
    busy: "Estimating…",
    send: async (asked) => answer.replaceChildren(fitAnswer(await api("/api/fit", asked), asked)),
  });
  return h(
    "div",
    { testid: "page-fit" },
    h(
      "div.page-head",
      {},
      h("h1", { text: "Will it fit?" }),
      h("span.muted", { text: "Training memory from the model's config alone: no weights are loaded." }),
    ),
    h("div.fit-layout", {}, h("section.card", {}, form), h("section.card", {}, h("h2", { text: "Answer" }), answer)),
  );
}

// ------------------------------------------------------------------ Train

// The data sets offered are /api/fit/options' `data` (lorafit's built-in names); any other value must be
// a file under a run root or the working directory.
const TRAIN_FIELDS = [
  FIELD.text("model", "Model", "models", "built in, random:<arch> (tiny and quick), or a model directory under a run root"),
  FIELD.text("data", "Data", "data", "built in, or a data file under a run root or the working directory"),
  FIELD.method,
  FIELD.batch_size,
  FIELD.max_length,
  { name: "max_steps", label: "Max steps", kind: "number", min: 1, placeholder: "empty: whole epochs" },
  { name: "epochs", label: "Epochs", kind: "number", min: 1, placeholder: "default (1)" },
  { name: "learning_rate", label: "Learning rate", kind: "number", step: "any", placeholder: "default (2e-4)" },
  FIELD.lora_r,
];

const trainState = { values: null };
const WAIT_POLL_MS = 500;

/** The launch's arguments: the fields that have a value (an empty one keeps lorafit's default). */
function trainArgs(values) {
  return Object.fromEntries(Object.entries(values).filter(([, v]) => v !== null && v !== ""));
}

/** Resolves once GET /api/runs/{id} knows the run (training wrote its config.yaml), or with false when
 * `left()` says the page was left first. Other errors than 404 are thrown. */
async function waitForRun(id, left) {
  while (!left()) {
    try {
      await api(`/api/runs/${encodeURIComponent(id)}`);
      return true;
    } catch (e) {
      if (e.status !== 404) throw e;
    }
    await new Promise((resolve) => setTimeout(resolve, WAIT_POLL_MS));
  }
  return false;
}

function launchedBox(r) {
  return h(
    "div",
    { testid: "train-started" },
    h("p", {}, "Started ", h("code", { testid: "train-run-dir", text: r.run_dir }), ` (process ${r.pid}).`),
    h("p.loading", { text: "Waiting for the training to start (model and data load first)…" }),
    r.log ? h("p.muted", {}, "Its output: ", h("code", { testid: "train-log", text: r.log })) : null,
  );
}

async function pageTrain() {
  const [options, runs] = await Promise.all([api("/api/fit/options"), api("/api/runs")]);
  showSources(runs.sources);
  const roots = (runs.sources && runs.sources.roots) || [];
  const values = trainState.values || { ...options.defaults, data: options.data[0] };
  const out = h("div", { testid: "train-result" });
  let left = false;
  onCleanup(() => (left = true));
  const { form, submit } = submitForm({
    prefix: "train",
    fields: TRAIN_FIELDS,
    choices: options,
    values,
    label: "Start training",
    out,
    memory: trainState,
    busy: "Starting…",
    send: async (asked) => {
      const r = await api("/api/launch", { command: "train", args: trainArgs(asked) });
      out.replaceChildren(launchedBox(r));
      if (await waitForRun(r.id, () => left)) location.hash = `#/run/${encodeURIComponent(r.id)}`;
    },
  });
  submit.disabled = !roots.length;
  const where = roots.length
    ? h("p.muted", {}, "Runs are written under ", h("code", { testid: "train-root", text: roots[0] }), ".")
    : h(
        "div.alert.alert-warn",
        { testid: "train-needs-root", role: "alert" },
        "Launching needs a run root: start ",
        h("code", { text: "lorafit ui --runs DIR" }),
        " and the runs started here are written under DIR.",
      );
  return h(
    "div",
    { testid: "page-train" },
    h(
      "div.page-head",
      {},
      h("h1", { text: "Train" }),
      h("span.muted", { text: "Starts lorafit train on this machine and follows it live." }),
    ),
    h(
      "div.fit-layout",
      {},
      h("section.card", {}, form),
      h("section.card", {}, h("h2", { text: "The run" }), where, out),
    ),
  );
}

// ------------------------------------------------------------------ start

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  if (!location.hash) history.replaceState(null, "", "#/runs");
  route();
});
