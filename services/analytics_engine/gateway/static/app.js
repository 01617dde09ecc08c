// AnalyticsEngine Demo UI: a live KPI dashboard, KPI definition editor, simulator controls and
// platform health. Plain ES module, no dependencies, no build step. Talks only to the gateway.
//
// Live values: EventSource cannot send headers, so the page trades its API key for a short-lived
// read-only stream token (POST /api/v1/sse-token) and opens /api/v1/stream?token=...; on a
// dropped connection the browser reconnects with Last-Event-ID and the gateway replays what was
// missed. When the token has expired the reconnect fails and we fetch a new token, passing the
// last id we saw as ?last_event_id=.

const KEY_STORAGE = "ae-api-key";
const THEME_STORAGE = "ae-theme";
const CODE_RE = /^[a-z][a-z0-9_]{0,62}$/;
const ADDITIVE = new Set(["count", "sum"]);
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  scope: null,
  definitions: new Map(), // code -> stored definition (with version)
  entityTypes: new Map(), // entity_type -> definition
  cards: new Map(), // code -> card state
  stream: null,
  lastEventId: null,
  reconnectTimer: null,
  editing: null, // definition being edited, or null for a new one
  points: 40,
  view: "dashboard",
};

// -- helpers ---------------------------------------------------------------------------------
const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function toast(message, kind = "info") {
  const node = el("div", { class: `toast ${kind}`, role: "status", text: message });
  $("#toasts").append(node);
  setTimeout(() => node.remove(), kind === "error" ? 7000 : 3500);
}

const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 2 });
const plain = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
function formatNumber(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Math.abs(value) >= 1e6 ? compact.format(value) : plain.format(value);
}

function formatTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString([], { hour12: false });
}

function durationMs(value, fallback = 60000) {
  if (typeof value === "number") return value * 1000;
  const match = /^\s*(\d+)\s*(ms|s|m|h|d)?\s*$/.exec(value || "");
  if (!match) return fallback;
  const unit = { ms: 1, s: 1000, m: 60000, h: 3600000, d: 86400000 }[match[2] || "s"];
  return Number(match[1]) * unit;
}

function dimsKey(dimensions) {
  const keys = Object.keys(dimensions || {}).sort();
  return JSON.stringify(keys.map((k) => [k, dimensions[k]]));
}

function dimsLabel(dimensions) {
  const values = Object.keys(dimensions || {}).sort().map((k) => dimensions[k]);
  return values.length ? values.map((v) => (v === null ? "—" : String(v))).join(" · ") : "all";
}

function level(thresholds, value) {
  if (!thresholds || value === null || value === undefined) return null;
  const above = (thresholds.direction || "above") === "above";
  const bad = (limit) => limit !== null && limit !== undefined && (above ? value >= limit : value <= limit);
  if (bad(thresholds.critical)) return "critical";
  if (bad(thresholds.warning)) return "warning";
  return "ok";
}

// -- API -------------------------------------------------------------------------------------
async function api(method, path, { body, headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (state.key) init.headers.Authorization = `Bearer ${state.key}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    return { status: 0, body: { error: { code: "network", message: "the gateway is unreachable" } }, headers: new Headers() };
  }
  let data = null;
  const text = await response.text();
  if (text) {
    try { data = JSON.parse(text); } catch { data = { error: { code: "invalid", message: text.slice(0, 200) } }; }
  }
  if (response.status === 401) askForKey("Your API key was not accepted.");
  return { status: response.status, body: data, headers: response.headers };
}

function errorMessage(reply) {
  return reply.body?.error?.message || `request failed (${reply.status})`;
}

// -- API key ---------------------------------------------------------------------------------
function askForKey(message = "") {
  const dialog = $("#key-dialog");
  $("#key-error").textContent = message;
  $("#key-input").value = "";
  if (!dialog.open) dialog.showModal();
}

async function connectWithKey(key) {
  state.key = key;
  const reply = await api("GET", "/api/v1/me");
  if (reply.status !== 200) {
    return reply.status === 401 ? "This key is not valid." : errorMessage(reply);
  }
  localStorage.setItem(KEY_STORAGE, key);
  state.scope = reply.body.scope;
  document.body.classList.toggle("read-only", state.scope !== "admin");
  $("#key-button").textContent = `${reply.body.scope} · ${reply.body.key_id.slice(0, 6)}`;
  return null;
}

// -- dashboard -------------------------------------------------------------------------------
function headline(card) {
  const definition = card.definition;
  const results = currentResults(card);
  if (!results.length) return { value: null, qualifier: "" };
  if (results.length === 1) return { value: results[0].value, qualifier: "" };
  const values = results.map((r) => r.value);
  if (!definition.query && ADDITIVE.has(definition.aggregation)) {
    return { value: values.reduce((a, b) => a + b, 0), qualifier: `total of ${results.length} groups` };
  }
  if (definition.aggregation === "min") {
    return { value: Math.min(...values), qualifier: `min of ${results.length} groups` };
  }
  return { value: Math.max(...values), qualifier: `max of ${results.length} groups` };
}

function currentResults(card) {
  let latestEnd = "";
  for (const r of card.latest.values()) if (r.window_end > latestEnd) latestEnd = r.window_end;
  return Array.from(card.latest.values()).filter((r) => r.window_end === latestEnd);
}

function combine(definition, values) {
  if (!values.length) return null;
  if (values.length === 1) return values[0];
  if (!definition.query && ADDITIVE.has(definition.aggregation)) return values.reduce((a, b) => a + b, 0);
  return definition.aggregation === "min" ? Math.min(...values) : Math.max(...values);
}

function seriesPoints(card) {
  const starts = Array.from(card.series.keys()).sort();
  return starts.slice(-state.points).map((start) => ({
    start,
    value: combine(card.definition, Array.from(card.series.get(start).values())),
  }));
}

function addResult(card, result) {
  const key = dimsKey(result.dimensions);
  const current = card.latest.get(key);
  if (!current || result.window_end >= current.window_end) card.latest.set(key, result);
  if (!card.series.has(result.window_start)) card.series.set(result.window_start, new Map());
  card.series.get(result.window_start).set(key, result.value);
  if (card.series.size > 200) {
    const oldest = Array.from(card.series.keys()).sort().slice(0, card.series.size - 200);
    for (const start of oldest) card.series.delete(start);
  }
}

function buildCard(definition) {
  const root = el("article", { class: "card", "data-kpi": definition.code },
    el("div", { class: "card-head" },
      el("div", {},
        el("div", { class: "card-title", text: definition.display_name }),
        el("div", { class: "card-code", text: definition.code })),
      el("span", { class: "badge", "data-role": "badge", text: "waiting" })),
    el("div", { class: "card-value" },
      el("span", { class: "value", "data-role": "value", text: "–" }),
      el("span", { class: "unit", text: definition.unit || "" }),
      el("span", { class: "qualifier", "data-role": "qualifier" })),
    el("div", { class: "card-meta" },
      el("span", { "data-role": "window", text: "no results yet" }),
      el("span", { "data-role": "updated" })));
  const chart = svg("svg", { class: "chart", viewBox: "0 0 300 84", preserveAspectRatio: "none", role: "img", "aria-label": "trend" });
  root.append(chart);
  const breakdown = el("ul", { class: "breakdown", "data-role": "breakdown" });
  if (definition.group_by && definition.group_by.length) root.append(breakdown);
  return { definition, root, chart, breakdown, latest: new Map(), series: new Map(), pending: false, updatedAt: null };
}

function renderCard(card) {
  card.pending = false;
  const { definition, root } = card;
  const { value, qualifier } = headline(card);
  const lvl = level(definition.thresholds, value);
  root.classList.remove("level-ok", "level-warning", "level-critical");
  if (lvl) root.classList.add(`level-${lvl}`);
  const badge = $("[data-role=badge]", root);
  badge.className = `badge${lvl ? ` level-${lvl}` : ""}`;
  badge.textContent = value === null ? "waiting" : (lvl || (definition.enabled === false ? "disabled" : "live"));
  $("[data-role=value]", root).textContent = formatNumber(value);
  $("[data-role=qualifier]", root).textContent = qualifier;
  const results = currentResults(card);
  if (results.length) {
    const r = results[0];
    $("[data-role=window]", root).textContent = `window ${formatTime(r.window_start)}–${formatTime(r.window_end)}`;
  }
  if (card.updatedAt) $("[data-role=updated]", root).textContent = `updated ${card.updatedAt.toLocaleTimeString([], { hour12: false })}`;
  drawChart(card);
  if (definition.group_by && definition.group_by.length) drawBreakdown(card, results);
}

function drawChart(card) {
  const { chart, definition } = card;
  chart.replaceChildren();
  const points = seriesPoints(card).filter((p) => p.value !== null);
  const width = 300, height = 84, pad = 6;
  for (const y of [pad, height / 2, height - pad]) {
    chart.append(svg("line", { class: "grid", x1: 0, x2: width, y1: y, y2: y, "vector-effect": "non-scaling-stroke" }));
  }
  if (points.length < 1) {
    const text = svg("text", { class: "nodata", x: width / 2, y: height / 2 + 4, "text-anchor": "middle" });
    text.textContent = "waiting for the first window";
    chart.append(text);
    return;
  }
  const values = points.map((p) => p.value);
  let min = Math.min(...values), max = Math.max(...values);
  const span = Math.max(max - min, Math.abs(max) * 0.1, 1e-9);
  const thresholds = [];
  for (const name of ["warning", "critical"]) {
    const limit = definition.thresholds?.[name];
    if (limit !== null && limit !== undefined && limit >= min - span && limit <= max + span) {
      thresholds.push([name, limit]);
      min = Math.min(min, limit);
      max = Math.max(max, limit);
    }
  }
  if (max === min) { max += 1; min -= 1; }
  const x = (i) => (points.length === 1 ? width / 2 : (i / (points.length - 1)) * width);
  const y = (v) => height - pad - ((v - min) / (max - min)) * (height - 2 * pad);
  for (const [name, limit] of thresholds) {
    chart.append(svg("line", { class: `thr-${name}`, x1: 0, x2: width, y1: y(limit), y2: y(limit), "vector-effect": "non-scaling-stroke" }));
  }
  const path = points.map((p, i) => `${i ? "L" : "M"}${x(i).toFixed(2)},${y(p.value).toFixed(2)}`).join(" ");
  if (points.length > 1) {
    chart.append(svg("path", { class: "area", d: `${path} L${width},${height} L0,${height} Z` }));
  }
  chart.append(svg("path", { class: "line", d: points.length > 1 ? path : `M0,${y(values[0])} L${width},${y(values[0])}`, "vector-effect": "non-scaling-stroke" }));
  const title = svg("title");
  title.textContent = `${points.length} windows, last ${formatNumber(values[values.length - 1])}`;
  chart.append(title);
}

function drawBreakdown(card, results) {
  const rows = results.slice().sort((a, b) => b.value - a.value).slice(0, 8);
  const peak = Math.max(...rows.map((r) => Math.abs(r.value)), 1e-9);
  card.breakdown.replaceChildren(...rows.map((r) => {
    const lvl = level(card.definition.thresholds, r.value);
    const bar = el("span", { class: lvl && lvl !== "ok" ? `level-${lvl}` : "" });
    bar.style.width = `${Math.max(2, (Math.abs(r.value) / peak) * 100)}%`;
    return el("li", {},
      el("span", { class: "label", title: dimsLabel(r.dimensions), text: dimsLabel(r.dimensions) }),
      el("span", { class: "bar" }, bar),
      el("span", { class: "num", text: formatNumber(r.value) }));
  }));
}

function scheduleRender(card) {
  if (card.pending) return;
  card.pending = true;
  requestAnimationFrame(() => renderCard(card));
}

async function loadCardData(card) {
  const code = card.definition.code;
  const latest = await api("GET", `/api/v1/kpis/${code}/latest`);
  if (latest.status === 200) for (const r of latest.body.items || []) addResult(card, r);
  const windowMs = card.definition.window
    ? durationMs(card.definition.window.slide || card.definition.window.size)
    : durationMs(card.definition.query?.schedule);
  const end = new Date(Date.now() + windowMs);
  const start = new Date(Date.now() - windowMs * (state.points + 2));
  const params = new URLSearchParams({ start: start.toISOString(), end: end.toISOString(), limit: "5000" });
  const history = await api("GET", `/api/v1/kpis/${code}/history?${params}`);
  if (history.status === 200) for (const r of history.body.items || []) addResult(card, r);
  renderCard(card);
}

async function loadDefinitions() {
  const reply = await api("GET", "/api/v1/kpi-definitions");
  if (reply.status !== 200) {
    if (reply.status !== 401) toast(`Could not load KPI definitions: ${errorMessage(reply)}`, "error");
    return false;
  }
  state.definitions = new Map(reply.body.items.map((d) => [d.code, d]));
  renderDefinitionsTable();
  const container = $("#cards");
  const wanted = reply.body.items.filter((d) => d.enabled !== false);
  for (const code of Array.from(state.cards.keys())) {
    const definition = state.definitions.get(code);
    if (!definition || definition.enabled === false) {
      state.cards.get(code).root.remove();
      state.cards.delete(code);
    }
  }
  const loads = [];
  for (const definition of wanted) {
    const existing = state.cards.get(definition.code);
    if (existing && existing.definition.version === definition.version) continue;
    const card = buildCard(definition);
    if (existing) existing.root.replaceWith(card.root); else container.append(card.root);
    state.cards.set(definition.code, card);
    loads.push(loadCardData(card));
  }
  const order = wanted.map((d) => state.cards.get(d.code).root);
  container.replaceChildren(...order);
  $("#cards-empty").hidden = wanted.length > 0;
  $("#dashboard-subtitle").textContent = `${wanted.length} KPI${wanted.length === 1 ? "" : "s"} · values update as windows close.`;
  await Promise.all(loads);
  return true;
}

function onResult(result) {
  const card = state.cards.get(result.kpi_code);
  if (!card) {
    if (!state.definitions.has(result.kpi_code)) debounceReload();
    return;
  }
  addResult(card, result);
  card.updatedAt = new Date();
  card.root.classList.remove("flash");
  void card.root.offsetWidth; // restart the animation
  card.root.classList.add("flash");
  scheduleRender(card);
}

let reloadTimer = null;
function debounceReload() {
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(loadDefinitions, 1000);
}

// -- live stream -----------------------------------------------------------------------------
function setLive(status) {
  const pill = $("#live-status");
  const labels = { live: "live", connecting: "connecting", reconnecting: "reconnecting", offline: "offline" };
  pill.textContent = labels[status];
  pill.className = `pill ${status === "live" ? "pill-live" : status === "offline" ? "pill-down" : "pill-warn"}`;
}

function closeStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
  clearTimeout(state.reconnectTimer);
}

async function connectStream() {
  closeStream();
  setLive("connecting");
  const reply = await api("POST", "/api/v1/sse-token");
  if (reply.status !== 201) {
    setLive("offline");
    state.reconnectTimer = setTimeout(connectStream, 5000);
    return;
  }
  const params = new URLSearchParams({ token: reply.body.token });
  if (state.lastEventId) params.set("last_event_id", state.lastEventId);
  const source = new EventSource(`/api/v1/stream?${params}`);
  state.stream = source;
  source.addEventListener("open", () => setLive("live"));
  source.addEventListener("kpi", (event) => {
    state.lastEventId = event.lastEventId || state.lastEventId;
    try { onResult(JSON.parse(event.data)); } catch (error) { console.warn("bad result", error); }
  });
  source.addEventListener("gap", () => {
    for (const card of state.cards.values()) loadCardData(card);
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      // Refused (e.g. the token expired): get a new token and resume after the last id.
      setLive("reconnecting");
      state.reconnectTimer = setTimeout(connectStream, 2000);
    } else {
      setLive("reconnecting"); // the browser retries by itself with Last-Event-ID
    }
  });
}

// -- definitions -----------------------------------------------------------------------------
function windowText(d) {
  if (d.query) return `query every ${d.query.schedule}`;
  if (!d.window) return "–";
  const w = d.window;
  return w.type === "sliding" ? `sliding ${w.size} / ${w.slide}` : `tumbling ${w.size}`;
}

function thresholdText(d) {
  const t = d.thresholds;
  if (!t || (t.warning == null && t.critical == null)) return "–";
  const sign = t.direction === "below" ? "≤" : "≥";
  return [t.warning != null ? `warn ${sign} ${formatNumber(t.warning)}` : null,
    t.critical != null ? `crit ${sign} ${formatNumber(t.critical)}` : null].filter(Boolean).join(", ");
}

function renderDefinitionsTable() {
  const body = $("#definitions-table tbody");
  const rows = Array.from(state.definitions.values()).map((d) => el("tr", { "data-code": d.code, class: state.editing?.code === d.code ? "selected" : "" },
    el("td", {}, el("div", { text: d.display_name }), el("div", { class: "mono muted", text: d.code })),
    el("td", { text: d.entity_type }),
    el("td", { text: d.query ? "query" : `${d.aggregation}${d.field ? `(${d.field})` : ""}${d.group_by?.length ? ` by ${d.group_by.join(", ")}` : ""}` }),
    el("td", { text: windowText(d) }),
    el("td", { text: thresholdText(d) }),
    el("td", { class: "mono", text: `v${d.version}${d.enabled === false ? " · off" : ""}` }),
    el("td", { class: "actions admin-only" },
      el("button", { type: "button", text: "Edit", onclick: () => openForm(d) }),
      " ",
      el("button", { type: "button", class: "danger", text: "Delete", onclick: () => deleteDefinition(d) }))));
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No KPI definitions yet." })));
}

function fillEntityTypes(selected) {
  const select = $("select[name=entity_type]");
  const names = Array.from(state.entityTypes.keys()).sort();
  if (selected && !names.includes(selected)) names.push(selected);
  select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  if (selected) select.value = selected;
  fillAttributes();
}

function fillAttributes() {
  const entity = state.entityTypes.get($("select[name=entity_type]").value);
  const names = Object.keys(entity?.attributes || {}).sort();
  $("#attribute-list").replaceChildren(...names.map((n) => el("option", { value: n })));
}

function setField(name, value) {
  const input = $(`#kpi-form [name="${name}"]`);
  if (!input) return;
  if (input.type === "checkbox") input.checked = value !== false;
  else input.value = value === null || value === undefined ? "" : String(value);
}

function openForm(definition = null) {
  state.editing = definition;
  const form = $("#kpi-form");
  form.reset();
  clearErrors();
  $("#form-title").textContent = definition ? `Edit ${definition.display_name}` : "New KPI";
  fillEntityTypes(definition?.entity_type || Array.from(state.entityTypes.keys()).sort()[0]);
  const d = definition || { window: { type: "tumbling", size: "1m", allowed_lateness: "10s" }, enabled: true, aggregation: "count", thresholds: { direction: "above" } };
  for (const name of ["code", "display_name", "description", "aggregation", "field", "filter", "unit"]) setField(name, d[name]);
  setField("group_by", (d.group_by || []).join(", "));
  setField("window.type", d.window?.type || "tumbling");
  setField("window.size", d.window?.size || "1m");
  setField("window.slide", d.window?.slide);
  setField("window.allowed_lateness", d.window?.allowed_lateness ?? "10s");
  setField("thresholds.warning", d.thresholds?.warning);
  setField("thresholds.critical", d.thresholds?.critical);
  setField("thresholds.direction", d.thresholds?.direction || "above");
  setField("enabled", d.enabled);
  $("[name=code]", form).disabled = Boolean(definition);
  form.hidden = false;
  renderDefinitionsTable();
  $(definition ? "[name=display_name]" : "[name=code]", form).focus();
}

function closeForm() {
  state.editing = null;
  $("#kpi-form").hidden = true;
  renderDefinitionsTable();
}

function clearErrors() {
  for (const node of $$("#kpi-form [data-error-for]")) {
    node.textContent = "";
    if (node.classList.contains("form-error")) node.hidden = true;
  }
  for (const input of $$("#kpi-form .invalid")) input.classList.remove("invalid");
}

function showErrors(details, fallback) {
  clearErrors();
  const unplaced = [];
  for (const { field, message } of details) {
    let path = field || "";
    if (/^group_by\.\d+$/.test(path)) path = "group_by";
    let target = $(`#kpi-form [data-error-for="${CSS.escape(path)}"]`);
    if (!target && path.includes(".")) {
      const parent = path.split(".")[0];
      target = $(`#kpi-form small[data-error-for="${CSS.escape(parent)}"]`);
    }
    if (!target || path === "") { unplaced.push(field ? `${field}: ${message}` : message); continue; }
    target.textContent = target.textContent ? `${target.textContent}; ${message}` : message;
    const input = $(`#kpi-form [name="${CSS.escape(path)}"]`);
    if (input) input.classList.add("invalid");
  }
  if (unplaced.length || (!details.length && fallback)) {
    const box = $("#kpi-form .form-error");
    box.textContent = unplaced.length ? unplaced.join(" · ") : fallback;
    box.hidden = false;
  }
  const first = $("#kpi-form .invalid");
  if (first) first.focus();
}

function numberOrRaw(text) {
  const trimmed = text.trim();
  if (trimmed === "") return null;
  const number = Number(trimmed);
  return Number.isFinite(number) ? number : trimmed; // the server reports what is wrong
}

function formBody() {
  const form = $("#kpi-form");
  const value = (name) => $(`[name="${name}"]`, form).value.trim();
  const body = {
    code: value("code"),
    display_name: value("display_name"),
    description: value("description"),
    entity_type: value("entity_type"),
    aggregation: value("aggregation"),
    field: value("field") || null,
    filter: value("filter") || null,
    group_by: value("group_by").split(",").map((s) => s.trim()).filter(Boolean),
    window: {
      type: value("window.type"),
      size: value("window.size"),
      slide: value("window.slide") || null,
      allowed_lateness: value("window.allowed_lateness") || "0s",
    },
    unit: value("unit") || null,
    thresholds: null,
    enabled: $("[name=enabled]", form).checked,
  };
  const warning = numberOrRaw(value("thresholds.warning"));
  const critical = numberOrRaw(value("thresholds.critical"));
  if (warning !== null || critical !== null) {
    body.thresholds = { warning, critical, direction: value("thresholds.direction") };
  }
  if (state.editing?.query) { // query KPIs are edited as they are, minus the streaming fields
    body.query = state.editing.query;
    delete body.aggregation; delete body.field; delete body.filter; delete body.window; body.group_by = [];
  }
  return body;
}

async function saveForm(event) {
  event.preventDefault();
  const body = formBody();
  if (!CODE_RE.test(body.code)) {
    showErrors([{ field: "code", message: "lowercase letters, digits and _, starting with a letter (at most 63)" }]);
    return;
  }
  const headers = state.editing ? { "If-Match": `"${state.editing.version}"` } : { "If-None-Match": "*" };
  const button = $("#form-save");
  button.disabled = true;
  const reply = await api("PUT", `/api/v1/kpi-definitions/${body.code}`, { body, headers });
  button.disabled = false;
  if (reply.status === 200 || reply.status === 201) {
    toast(reply.status === 201 ? `Created ${body.code}` : `Saved ${body.code} (v${reply.body.version})`, "success");
    closeForm();
    await loadDefinitions();
    return;
  }
  if (reply.status === 422) {
    showErrors(reply.body.error.details || [], reply.body.error.message);
  } else if (reply.status === 412) {
    const message = state.editing
      ? "Someone else changed this KPI meanwhile. Reload it to edit the latest version."
      : `A KPI with the code ${body.code} already exists.`;
    showErrors(state.editing ? [] : [{ field: "code", message }], message);
  } else {
    showErrors([], errorMessage(reply));
  }
}

async function deleteDefinition(definition) {
  if (!confirm(`Delete the KPI "${definition.display_name}" (${definition.code})?`)) return;
  const reply = await api("DELETE", `/api/v1/kpi-definitions/${definition.code}`, { headers: { "If-Match": `"${definition.version}"` } });
  if (reply.status === 204) {
    toast(`Deleted ${definition.code}`, "success");
    if (state.editing?.code === definition.code) closeForm();
    await loadDefinitions();
  } else {
    toast(`Could not delete: ${errorMessage(reply)}`, "error");
  }
}

async function loadEntityTypes() {
  const reply = await api("GET", "/api/v1/entity-types");
  if (reply.status === 200) state.entityTypes = new Map(reply.body.items.map((e) => [e.entity_type, e]));
}

// -- platform --------------------------------------------------------------------------------
async function refreshSimulator() {
  const reply = await api("GET", "/api/v1/simulator");
  if (reply.status !== 200) {
    $("#sim-state").textContent = "unavailable";
    $("#sim-error").textContent = errorMessage(reply);
    return;
  }
  $("#sim-error").textContent = "";
  renderSimulator(reply.body);
}

function renderSimulator(status) {
  // backpressure: streams whose readers are down or behind hold the simulator back
  const waiting = status.waiting_for?.length ? ` (waiting: ${status.waiting_for.join(", ")} full)` : "";
  $("#sim-state").textContent = (status.running ? "running" : "stopped") + waiting;
  $("#sim-state").className = status.running ? "status-up" : "";
  $("#sim-rate").textContent = `${formatNumber(status.rate)}/s`;
  $("#sim-measured").textContent = status.measured_rate !== undefined ? `${formatNumber(status.measured_rate)}/s` : "–";
  $("#sim-events").textContent = formatNumber(status.events_emitted);
}

async function simulatorAction(method, path, body) {
  const reply = await api(method, path, body === undefined ? {} : { body });
  if (reply.status === 200) {
    $("#sim-error").textContent = "";
    renderSimulator(reply.body);
  } else {
    const details = reply.body?.error?.details;
    $("#sim-error").textContent = details?.length ? details.map((d) => d.message).join("; ") : errorMessage(reply);
  }
}

async function refreshStatus() {
  const reply = await api("GET", "/api/v1/status");
  const summary = $("#health-summary");
  if (reply.status !== 200) {
    summary.textContent = "status unavailable";
    summary.className = "pill pill-down";
    return;
  }
  const status = reply.body;
  const services = status.services || [];
  const up = services.filter((s) => s.status === "up").length;
  const redisDown = status.redis?.reachable === false;
  summary.textContent = redisDown ? "Redis unreachable" : `services ${up}/${services.length}`;
  summary.title = redisDown ? status.redis.error || "" : "Services up";
  summary.className = `pill ${redisDown ? "pill-down" : up === services.length && services.length ? "pill-live" : "pill-warn"}`;
  if (state.view !== "platform") return;
  $("#services-table tbody").replaceChildren(...services.map((s) => el("tr", {},
    el("td", { text: s.service }),
    el("td", { class: `status-${s.status}`, text: s.status }),
    el("td", { text: String((s.instances || []).length) }),
    lagCell(s.consumer_lag || {}))));
  // Dead letters are counted in Redis: while it is unreachable they are unknown, not none.
  const dead = Object.entries(status.dead_letters || {});
  const noRows = status.dead_letters === undefined
    ? el("td", { colspan: 2, class: "num-bad", text: `Unknown: ${status.redis?.error || "Redis is unreachable"}` })
    : el("td", { colspan: 2, class: "muted", text: "No dead letters." });
  $("#dead-letters-table tbody").replaceChildren(...(dead.length ? dead.map(([channel, count]) => el("tr", {},
    el("td", { class: "mono", text: channel }), el("td", { class: count ? "num-bad" : "", text: formatNumber(count) })))
    : [el("tr", {}, noRows)]));
  const rates = Object.entries(status.message_rates || {});
  $("#rates-table tbody").replaceChildren(...rates.map(([channel, rate]) => el("tr", {},
    el("td", { class: "mono", text: channel }), el("td", { text: formatNumber(rate) }))));
}

function lagCell(lag) {
  // Total backlog of the service's consumer groups; the per-channel detail is in the tooltip.
  const entries = Object.entries(lag);
  const total = entries.reduce((sum, [, n]) => sum + n, 0);
  const detail = entries.map(([channel, n]) => `${channel}: ${n}`).join("\n");
  if (!entries.length) return el("td", { class: "muted", text: "–" });
  return el("td", { class: total > 1000 ? "num-bad" : "", title: detail,
    text: `${formatNumber(total)} on ${entries.length} channel${entries.length === 1 ? "" : "s"}` });
}

// -- navigation and theme --------------------------------------------------------------------
function show(view) {
  state.view = view;
  for (const tab of $$(".tabs button")) tab.setAttribute("aria-selected", String(tab.dataset.view === view));
  for (const section of $$("section.view")) section.hidden = section.dataset.view !== view;
  if (location.hash !== `#${view}`) history.replaceState(null, "", `#${view}`);
  if (view === "platform") { refreshSimulator(); refreshStatus(); }
}

function applyTheme(theme) {
  if (theme === "auto") document.documentElement.removeAttribute("data-theme");
  else document.documentElement.setAttribute("data-theme", theme);
  $("#theme-button").title = `Theme: ${theme}`;
}

// -- start -----------------------------------------------------------------------------------
async function start() {
  await loadEntityTypes();
  await loadDefinitions();
  connectStream();
  refreshStatus();
}

function wire() {
  for (const tab of $$(".tabs button")) tab.addEventListener("click", () => show(tab.dataset.view));
  for (const link of $$("[data-goto]")) link.addEventListener("click", (e) => { e.preventDefault(); show(link.dataset.goto); });
  $("#key-button").addEventListener("click", () => askForKey());
  $("#key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const problem = await connectWithKey($("#key-input").value.trim());
    if (problem) { $("#key-error").textContent = problem; return; }
    $("#key-dialog").close();
    start();
  });
  $("#key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    state.key = "";
    closeStream();
    setLive("offline");
    $("#key-error").textContent = "Key removed from this browser.";
  });
  let theme = localStorage.getItem(THEME_STORAGE) || "auto";
  applyTheme(theme);
  $("#theme-button").addEventListener("click", () => {
    theme = { auto: "dark", dark: "light", light: "auto" }[theme];
    localStorage.setItem(THEME_STORAGE, theme);
    applyTheme(theme);
  });
  $("#trend-points").addEventListener("change", (e) => {
    state.points = Number(e.target.value);
    for (const card of state.cards.values()) loadCardData(card);
  });
  $("#new-kpi").addEventListener("click", () => openForm(null));
  $("#form-cancel").addEventListener("click", closeForm);
  $("#kpi-form").addEventListener("submit", saveForm);
  $("select[name=entity_type]").addEventListener("change", fillAttributes);
  $("#sim-start").addEventListener("click", () => simulatorAction("POST", "/api/v1/simulator/start"));
  $("#sim-stop").addEventListener("click", () => simulatorAction("POST", "/api/v1/simulator/stop"));
  $("#sim-rate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    simulatorAction("PUT", "/api/v1/simulator/rate", { rate: numberOrRaw($("#sim-rate-input").value) });
  });
  setInterval(() => { if (state.scope) refreshStatus(); }, 5000);
  setInterval(() => { if (state.scope && state.view === "platform") refreshSimulator(); }, 3000);
}

async function main() {
  wire();
  const initial = location.hash.slice(1);
  show(["dashboard", "definitions", "platform"].includes(initial) ? initial : "dashboard");
  setLive("offline");
  if (!state.key) { askForKey(); return; }
  const problem = await connectWithKey(state.key);
  if (problem) { askForKey(problem); return; }
  start();
}

main();
