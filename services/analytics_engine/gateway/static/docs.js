// A minimal OpenAPI 3 renderer written for this project (no third-party code, no CDN): it reads
// /api/v1/openapi.json and shows every operation with its parameters, request body schema,
// responses, and a "Try it" form that sends the request with the API key from localStorage.

const KEY_STORAGE = "ae-api-key";
const METHODS = ["get", "put", "post", "delete", "patch"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function markdown(text) {
  // Just what the descriptions use: paragraphs, **bold** and `code`; built as DOM nodes, so
  // nothing from the document is ever parsed as HTML.
  return (text || "").split(/\n\s*\n/).map((paragraph) => el("p", {},
    paragraph.split(/(\*\*[^*]+\*\*|`[^`]+`)/).filter(Boolean).map((part) => {
      if (part.startsWith("**")) return el("strong", { text: part.slice(2, -2) });
      if (part.startsWith("`")) return el("code", { text: part.slice(1, -1) });
      return part.replace(/\n/g, " ");
    })));
}

function resolve(doc, schema, depth = 0, seen = new Set()) {
  // Inline $refs (to a bounded depth) so a schema reads as one JSON document.
  if (!schema || typeof schema !== "object" || depth > 6) return schema;
  if (Array.isArray(schema)) return schema.map((s) => resolve(doc, s, depth + 1, seen));
  if (schema.$ref) {
    const name = schema.$ref.split("/").pop();
    if (seen.has(name)) return { $ref: schema.$ref };
    const target = doc.components?.schemas?.[name];
    return resolve(doc, target, depth + 1, new Set([...seen, name]));
  }
  const out = {};
  for (const [key, value] of Object.entries(schema)) out[key] = resolve(doc, value, depth + 1, seen);
  return out;
}

function example(doc, schema, depth = 0) {
  const s = resolve(doc, schema);
  if (!s || depth > 5) return null;
  if (s.example !== undefined) return s.example;
  if (s.default !== undefined && s.default !== null) return s.default;
  if (s.enum) return s.enum[0];
  if (s.anyOf) return example(doc, s.anyOf.find((x) => x.type !== "null") || s.anyOf[0], depth + 1);
  switch (s.type) {
    case "object": {
      const out = {};
      for (const name of s.required || Object.keys(s.properties || {}).slice(0, 6)) {
        if (s.properties?.[name]) out[name] = example(doc, s.properties[name], depth + 1);
      }
      return out;
    }
    case "array": return [];
    case "integer": return 1;
    case "number": return 1.5;
    case "boolean": return true;
    case "string": return s.pattern?.includes("ms|s|m|h|d") ? "1m" : "string";
    default: return null;
  }
}

function tryForm(doc, method, path, op) {
  const params = op.parameters || [];
  const inputs = params.map((p) => {
    const input = el("input", { "data-name": p.name, "data-in": p.in, placeholder: p.schema?.pattern || p.schema?.type || "" });
    return el("label", {}, el("span", { text: `${p.name} (${p.in})${p.required ? " *" : ""}` }), input);
  });
  const bodySchema = op.requestBody?.content?.["application/json"]?.schema;
  const textarea = bodySchema ? el("textarea", {}, JSON.stringify(example(doc, bodySchema), null, 2)) : null;
  const output = el("pre", { hidden: true });
  const stream = (op.responses?.["200"]?.content || {})["text/event-stream"];
  async function send() {
    let url = path;
    const query = new URLSearchParams();
    const headers = { Accept: "application/json" };
    for (const input of inputs.map((l) => l.querySelector("input"))) {
      const { name, in: where } = input.dataset;
      const value = input.value;
      if (!value) continue;
      if (where === "path") url = url.replace(`{${name}}`, encodeURIComponent(value));
      else if (where === "query") query.set(name, value);
      else if (where === "header") headers[name] = value;
    }
    const key = document.getElementById("docs-key").value || localStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = { method: method.toUpperCase(), headers };
    if (textarea) { init.body = textarea.value; headers["Content-Type"] = "application/json"; }
    const full = query.toString() ? `${url}?${query}` : url;
    output.hidden = false;
    output.textContent = `${init.method} ${full} …`;
    try {
      const controller = new AbortController();
      if (stream) setTimeout(() => controller.abort(), 5000);
      const response = await fetch(full, { ...init, signal: controller.signal });
      let text = "";
      try { text = await response.text(); } catch { text = "(stream closed after 5 s)"; }
      let pretty = text;
      try { pretty = JSON.stringify(JSON.parse(text), null, 2); } catch { /* not JSON */ }
      output.replaceChildren(
        el("span", { class: `status-${String(response.status)[0]}`, text: `${response.status} ${response.statusText}` }),
        `\nX-Request-ID: ${response.headers.get("X-Request-ID") || ""}\n\n${pretty}`);
    } catch (error) {
      output.textContent = stream ? "(stream sampled for 5 s; use curl -N for a live view)" : String(error);
    }
  }
  return el("div", { class: "try" }, el("h4", { text: "Try it" }), inputs, textarea,
    el("div", {}, el("button", { class: "primary", type: "button", onclick: send, text: "Send" })), output);
}

function operation(doc, path, method, op) {
  const scope = op["x-required-scope"] ? `scope: ${op["x-required-scope"]}` : "open";
  const params = op.parameters || [];
  const body = el("div", { class: "body" });
  if (op.description) body.append(...markdown(op.description));
  if (params.length) {
    body.append(el("h4", { text: "Parameters" }), el("table", { class: "table" },
      el("thead", {}, el("tr", {}, el("th", { text: "Name" }), el("th", { text: "In" }), el("th", { text: "Schema" }), el("th", { text: "Description" }))),
      el("tbody", {}, params.map((p) => el("tr", {},
        el("td", { class: "mono", text: `${p.name}${p.required ? " *" : ""}` }),
        el("td", { text: p.in }),
        el("td", { class: "mono", text: JSON.stringify(p.schema || {}) }),
        el("td", { text: p.description || "" }))))));
  }
  const bodySchema = op.requestBody?.content?.["application/json"]?.schema;
  if (bodySchema) {
    body.append(el("h4", { text: "Request body (application/json)" }), el("pre", { text: JSON.stringify(resolve(doc, bodySchema), null, 2) }));
  }
  body.append(el("h4", { text: "Responses" }), el("table", { class: "table" },
    el("tbody", {}, Object.entries(op.responses || {}).map(([status, r]) => el("tr", {},
      el("td", { class: `mono status-${status[0]}`, text: status }),
      el("td", { text: r.description || "" }),
      el("td", { class: "mono muted", text: Object.keys(r.content || {}).join(", ") }))))));
  body.append(tryForm(doc, method, path, op));
  return el("details", { class: "op panel", id: op.operationId },
    el("summary", {}, el("span", { class: `method ${method}`, text: method.toUpperCase() }),
      el("span", { class: "path", text: path }), el("span", { text: op.summary || "" }),
      el("span", { class: "scope", text: scope })), body);
}

async function main() {
  document.getElementById("docs-key").value = localStorage.getItem(KEY_STORAGE) || "";
  const doc = await (await fetch("/api/v1/openapi.json")).json();
  const byTag = new Map();
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags || ["Other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push([path, method, op]);
    }
  }
  const content = document.getElementById("content");
  const toc = document.getElementById("toc");
  content.replaceChildren(el("h1", { text: `${doc.info.title} ${doc.info.version}` }),
    el("p", { class: "muted", text: `OpenAPI ${doc.openapi}` }),
    el("div", { class: "panel intro" }, markdown(doc.info.description)));
  for (const [tag, ops] of byTag) {
    toc.append(el("h3", { text: tag }));
    content.append(el("h2", { id: `tag-${tag}`, text: tag, class: "tag-title" }));
    for (const [path, method, op] of ops) {
      toc.append(el("a", { href: `#${op.operationId}` }, el("span", { class: `method ${method}`, text: method.toUpperCase() }), el("span", { class: "mono", text: path })));
      content.append(operation(doc, path, method, op));
    }
  }
  if (location.hash) document.getElementById(location.hash.slice(1))?.setAttribute("open", "");
}

main();
