// specd's status page: polls /status and /status/history and draws them with uPlot.
// No build step: plain script, uPlot from the same package (static/uPlot.iife.min.js).
"use strict";

const POLL_MS = 5000;
const KEY = "specd-api-key";
const $ = (id) => document.getElementById(id);
const charts = {};
let selectedRun = null;

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  const key = localStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  const resp = await fetch(path, { ...options, headers });
  if (resp.status === 401) {
    $("keyform").hidden = false;
    throw new Error("this daemon needs its API key");
  }
  const body = await resp.json();
  if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
  return body;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(digits);
  return String(v);
}

function when(t) {
  return t ? new Date(t * 1000).toLocaleString() : "-";
}

function el(tag, text, attrs = {}) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// --- charts -------------------------------------------------------------------------------

function markers(times) {
  // dashed vertical lines (adapter versions) on the time axis
  return {
    hooks: {
      draw: (u) => {
        const ctx = u.ctx;
        ctx.save();
        ctx.setLineDash([4, 4]);
        ctx.strokeStyle = "#999";
        ctx.fillStyle = "#555";
        for (const [t, label] of times) {
          const x = u.valToPos(t, "x", true);
          if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.fillText(label, x + 3, u.bbox.top + 10);
        }
        ctx.restore();
      },
    },
  };
}

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

function draw(id, xs, series, opts = {}) {
  // (re)draw a chart; the container keeps what it holds as data-* for tests and scripts
  const box = $(id);
  box.dataset.points = String(xs.length);
  box.dataset.series = JSON.stringify(series.map((s) => s.label));
  box.dataset.values = JSON.stringify(series.map((s) => s.values));
  if (!xs.length) {
    if (charts[id]) { charts[id].destroy(); delete charts[id]; }
    box.replaceChildren(el("p", "nothing yet", { class: "empty" }));
    return;
  }
  const key = JSON.stringify(series.map((s) => s.label)) + (opts.key || "");
  const data = [xs, ...series.map((s) => s.values)];
  if (charts[id] && charts[id]._key === key) {
    charts[id].setData(data);
    return;
  }
  if (charts[id]) charts[id].destroy();
  box.replaceChildren();
  const u = new uPlot({
    width: Math.max(400, box.clientWidth || 900),
    height: 220,
    scales: { x: { time: opts.time !== false } },
    axes: opts.axes || [{}, {}],
    plugins: opts.plugins || [],
    series: [
      {},
      ...series.map((s, i) => ({
        label: s.label,
        stroke: s.color || COLORS[i % COLORS.length],
        dash: s.dash,
        scale: s.scale || "y",
        width: 1.5,
        spanGaps: true,
        points: { show: s.points !== false, size: 4 },  // sparse traffic: a bucket is a dot
      })),
    ],
  }, data, box);
  u._key = key;
  charts[id] = u;
}

function drawTraffic(history, status, isPrimary) {
  const buckets = history.traffic.buckets;
  const xs = buckets.map((b) => b.start + history.traffic.step / 2);
  const speed = [{ label: "tokens/s", values: buckets.map((b) => b.tokens_per_s) }];
  const verify = status.speculation && status.speculation.verify_s && status.speculation.verify_s["1"];
  if (isPrimary && verify) {
    speed.push({ label: "target alone (measured)", values: xs.map(() => 1 / verify), dash: [6, 4], color: "#888", points: false });
  }
  const marks = history.adapters.versions
    .filter((v) => v.created && v.status === "installed")
    .map((v) => [v.created, "v" + v.version]);
  draw("chart-speed", xs, speed, { plugins: [markers(marks)], key: marks.length });

  const sources = [...new Set(buckets.flatMap((b) => Object.keys(b.by_source)))].sort();
  const acc = [{ label: "all", values: buckets.map((b) => b.acceptance_rate) }];
  for (const s of sources) {
    acc.push({
      label: s,
      values: buckets.map((b) => {
        const c = b.by_source[s];
        return c && c.drafted ? c.accepted / c.drafted : null;
      }),
    });
  }
  draw("chart-acceptance", xs, acc);
  const perHour = 3600 / history.traffic.step;
  draw("chart-requests", xs, [
    { label: "requests/hour", values: buckets.map((b) => b.requests * perHour), points: false },
  ]);
}

// --- tables -------------------------------------------------------------------------------

function gateText(gate) {
  if (!gate) return "-";
  return gate.decision + (gate.reason ? ": " + gate.reason : "");
}

function drawRuns(runs) {
  const body = $("runs").querySelector("tbody");
  body.replaceChildren();
  if (!runs.length) body.append(row(["no training run yet"], "empty"));
  for (const r of runs) {
    const s = r.summary || {};
    const tr = row([
      r.run_id, when(r.started), r.status + (r.error ? " (" + r.error + ")" : ""),
      s.steps === undefined ? "-" : s.steps + (s.skipped_micro_batches ? ` (${s.skipped_micro_batches} skipped)` : ""),
      s.loss_first === undefined ? "-" : fmt(s.loss_first) + " → " + fmt(s.loss_last),
      s.heldout_before === undefined ? "-" : fmt(s.heldout_before) + " → " + fmt(s.heldout_after),
      gateText(r.gate), s.wall_s === undefined ? "-" : fmt(s.wall_s, 1) + " s",
    ]);
    tr.dataset.run = r.run_id;
    if (r.run_id === selectedRun) tr.className = "selected";
    tr.onclick = () => { selectedRun = r.run_id; render(); };
    body.append(tr);
  }
  const withSteps = runs.filter((r) => r.steps.length);
  let run = runs.find((r) => r.run_id === selectedRun);
  if (!run && withSteps.length) run = withSteps[withSteps.length - 1];
  $("run-title").textContent = run ? "loss and gradient norm per step, run " + run.run_id : "";
  const steps = run ? run.steps : [];
  draw("chart-run", steps.map((s) => s.step), [
    { label: "loss", values: steps.map((s) => s.loss), points: false },
    { label: "grad norm", values: steps.map((s) => s.grad_norm), scale: "g", points: false },
  ], { time: false, axes: [{}, { scale: "y" }, { scale: "g", side: 1 }], key: run ? run.run_id : "" });
}

function row(cells, cls) {
  const tr = el("tr");
  if (cls) tr.className = cls;
  for (const c of cells) tr.append(c instanceof Node ? cellOf(c) : el("td", c));
  return tr;
}

function cellOf(node) {
  const td = el("td");
  td.append(node);
  return td;
}

function drawAdapters(adapters, model) {
  const body = $("adapters").querySelector("tbody");
  body.replaceChildren();
  const versions = [{ version: 0, status: "none", created: null }, ...adapters.versions];
  for (const v of versions) {
    const current = v.version === adapters.current;
    let action = el("span", current ? "in service" : "");
    if (!current && adapters.admin) {
      action = el("button", "roll back to this", { "data-version": String(v.version) });
      action.onclick = () => rollback(v.version, model);
    }
    body.append(row([
      v.version ? "v" + v.version : "no adapter", v.status, when(v.created),
      fmt(v.expected_speedup), fmt(v.heldout_agreement), gateText(v.gate), action,
    ], current ? "selected" : ""));
  }
}

async function rollback(version, model) {
  try {
    await api("admin/adapters/rollback", { method: "POST", body: JSON.stringify({ version, model }) });
    await refresh();
  } catch (e) {
    showError(e);
  }
}

function drawMoment(status, models) {
  const box = $("moment");
  box.replaceChildren();
  const lines = (value) => Object.entries(value || {})
    .map(([k, v]) => `${k}: ${Array.isArray(v) ? v.length + " entries" : v && typeof v === "object" ? JSON.stringify(v) : fmt(v)}`)
    .join("\n");
  const panel = (title, value) => {
    const d = el("div");
    d.append(el("h3", title), el("pre", typeof value === "string" ? value : lines(value)));
    box.append(d);
  };
  panel("models", models.map((m) => `${m.id}: ${m.loaded ? "loaded" : "not loaded"}, adapter v${m.adapter_version || 0}`).join("\n"));
  panel("queue and batch", status.queue);
  if (status.buffer) panel("replay buffer", status.buffer);
  if (status.prompt_cache) panel("prompt cache", status.prompt_cache);
  if (status.suffix_index) panel("suffix index", status.suffix_index);
  if (status.group) panel("group", status.group);
  if (status.training) panel("training", { state: status.training.state, waiting_for: status.training.waiting_for, pending_failures: status.training.pending_failures });
  const warnings = [];
  if ((status.pending_restart || []).length) warnings.push("waiting for a restart: " + status.pending_restart.join(", "));
  if (status.provider_errors) warnings.push("status errors: " + JSON.stringify(status.provider_errors));
  if (status.buffer && status.buffer.dropped_records) warnings.push(status.buffer.dropped_records + " records lost");
  panel("warnings", warnings.length ? warnings.join("\n") : "none");
}

// --- the loop -----------------------------------------------------------------------------

let state = null;

async function refresh() {
  const model = $("model").value || "";
  const span = Number($("window").value);
  const since = Date.now() / 1000 - span;
  const query = `since=${since}` + (model ? `&model=${encodeURIComponent(model)}` : "");
  const [status, models, history] = await Promise.all([
    api("status"), api("v1/models"), api("status/history?" + query),
  ]);
  state = { status, models: models.data, history, model: history.model };
  render();
}

function render() {
  if (!state) return;
  const { status, models, history } = state;
  const select = $("model");
  if (select.options.length !== models.length) {
    const chosen = select.value;
    select.replaceChildren(...models.map((m) => el("option", m.id, { value: m.id })));
    if (chosen) select.value = chosen;
  }
  $("version").textContent = "v" + status.version;
  const isPrimary = history.model === models[0].id;
  drawTraffic(history, status, isPrimary);
  drawRuns(history.runs);
  drawAdapters(history.adapters, history.model);
  drawMoment(status, models);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  $("error").hidden = true;
  window.specdPage = { status, history, models };
}

function showError(e) {
  $("error").textContent = String(e.message || e);
  $("error").hidden = false;
}

async function tick() {
  try { await refresh(); } catch (e) { showError(e); }
}

$("keyform").onsubmit = (ev) => {
  ev.preventDefault();
  localStorage.setItem(KEY, $("key").value);
  $("keyform").hidden = true;
  tick();
};
$("model").onchange = tick;
$("window").onchange = tick;
tick();
setInterval(tick, POLL_MS);
