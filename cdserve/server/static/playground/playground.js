// cdserve playground: builds the steering controls from GET /v1/scorers, streams a plain
// (mode: none) and a steered answer side by side through the server's own OpenAI API with the
// same seed, and draws what each answer's `control` reports. Plain JavaScript, no build step, no
// request to any other host. The API key lives only in this tab's memory.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  apiKey: "",
  scorer: null,   // GET /v1/scorers data[0]
  model: null,    // GET /v1/models data[0]
  abort: null,    // AbortController of the runs in flight
  results: {},    // panel id -> the `control` its answer reported
  loading: null,  // retry timer while the server is not ready
};

const MODE_HELP = {
  token: "token: every step reweights the base model's top_k next tokens by strength × the weighted head values.",
  block: "block: samples `candidates` blocks of `block size` tokens, keeps the best by combined value, repeats.",
  best_of_n: "best_of_n: samples `candidates` whole answers and keeps the one with the best combined value.",
};

// ---------------------------------------------------------------- talking to the server

class ApiError extends Error {
  constructor(status, message, param, retryAfter) {
    super(message);
    this.status = status;       // HTTP status; 0 for an error sent inside a stream
    this.param = param || null;
    this.retryAfter = retryAfter || null;
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.apiKey) h["Authorization"] = "Bearer " + state.apiKey;
  return h;
}

async function httpError(response) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch (_) { /* not JSON: the status line says it */ }
  return new ApiError(response.status, error.message || response.statusText || "HTTP " + response.status,
                      error.param, response.headers.get("Retry-After"));
}

async function apiGet(path) {
  const response = await fetch(path, { headers: headers(false) });
  if (!response.ok) throw await httpError(response);
  return response.json();
}

// An error in words, as the page shows it.
function describe(err) {
  if (err.name === "AbortError") return "Stopped.";
  if (!(err instanceof ApiError)) return "Could not reach the server: " + err.message;
  // The server's messages usually start with the parameter they name; say it only when not.
  const param = err.param && !err.message.startsWith(err.param) ? " (parameter " + err.param + ")" : "";
  switch (err.status) {
    case 0: return "The answer failed while streaming: " + err.message + param;
    case 400: return "The server refused the request (400)" + param + ": " + err.message;
    case 401: return "The server needs a valid API key (401): " + err.message +
                     ". Enter the key in the API key box at the top.";
    case 404: return "Not found: " + err.message;
    case 413: return "The request is too large: " + err.message;
    case 503: return "The server is busy or not ready (503): " + err.message +
                     (err.retryAfter ? ". Try again in " + err.retryAfter + " s." : ".");
    default: return "The server answered " + err.status + ": " + err.message + param;
  }
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

// ---------------------------------------------------------------- start-up

async function load() {
  clearTimeout(state.loading);
  try {
    const [scorers, models] = await Promise.all([apiGet("/v1/scorers"), apiGet("/v1/models")]);
    state.scorer = scorers.data[0];
    state.model = models.data[0];
  } catch (err) {
    notice(describe(err));
    $("server-info").textContent = "not connected";
    if (err instanceof ApiError && err.status === 401) {
      $("api-key").setAttribute("aria-invalid", "true");
      $("api-key").focus();
    } else if (err instanceof ApiError && err.status === 503) {
      state.loading = setTimeout(load, 2000);  // still loading the model: ask again
    }
    return;
  }
  notice(null);
  $("api-key").removeAttribute("aria-invalid");
  const s = state.scorer;
  $("server-info").textContent = "model " + state.model.id + " · scorer " + s.id +
    (state.model.backend ? " · backend " + state.model.backend : "");
  $("scorer-warning").hidden = s.trained;
  $("scorer-warning").textContent = "This scorer is untrained: its steering is random.";
  buildControls(s);
  $("run").disabled = false;
  refresh();
}

function setRange(input, range) {
  if (!range) return;
  input.min = range.min;
  input.max = range.max;
}

function buildControls(scorer) {
  const box = $("heads");
  box.replaceChildren();
  const range = scorer.ranges.weights;
  for (const head of scorer.heads) {
    const row = document.createElement("div");
    row.className = "head";
    row.title = head.description;
    const name = document.createElement("label");
    name.className = "head-name";
    name.htmlFor = "w-" + head.name;
    name.textContent = head.name;
    const slider = document.createElement("input");
    slider.type = "range";
    slider.id = "w-" + head.name;
    slider.dataset.head = head.name;
    setRange(slider, range);
    slider.step = String(Math.max((range.max - range.min) / 2000, 0.001));
    slider.value = head.default_weight;
    const number = document.createElement("input");
    number.type = "number";
    number.id = "wn-" + head.name;
    number.inputMode = "decimal";
    number.step = "0.1";
    setRange(number, range);
    number.value = head.default_weight;
    number.setAttribute("aria-label", head.name + " weight");
    // The slider covers the allowed range; the box takes any number, so the server judges it.
    slider.addEventListener("input", () => { number.value = slider.value; refresh(); });
    number.addEventListener("input", () => { slider.value = number.value; refresh(); });
    const help = document.createElement("p");
    help.className = "muted head-help";
    help.textContent = head.description;
    row.append(name, slider, number, help);
    box.append(row);
  }
  const d = scorer.defaults;
  $("mode").value = d.mode && d.mode !== "none" ? d.mode : "token";
  $("selection").value = d.selection || "argmax";
  $("tail").value = d.tail || "drop";
  for (const field of ["strength", "top_k", "plausibility", "block_size", "num_candidates"]) {
    setRange($(field), scorer.ranges[field]);
    $(field).value = d[field];
  }
}

// ---------------------------------------------------------------- the request

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

// Which controls the mode uses: data-modes lists "mode" or "mode:selection" tokens.
function shown(el) {
  const mode = $("mode").value;
  const selection = $("selection").value;
  return el.dataset.modes.split(" ").some((t) => t === mode || t === mode + ":" + selection);
}

function weights() {
  const out = {};
  for (const box of document.querySelectorAll("#heads input[type=number]")) {
    // Heads left out weigh 0: only the others go into the request.
    if (box.value.trim() !== "" && Number(box.value) !== 0) out[box.id.slice(3)] = Number(box.value);
  }
  return out;
}

function steeredControl() {
  const control = { mode: $("mode").value, weights: weights() };
  for (const label of document.querySelectorAll("[data-modes]")) {
    if (!shown(label)) continue;
    const input = label.querySelector("input, select");
    control[input.id] = input.tagName === "SELECT" ? input.value : number(input.id);
  }
  return control;
}

function plainControl() {
  // The same weights, so the plain answer's combined value is comparable.
  return { mode: "none", weights: weights() };
}

function chat() {
  return document.querySelector("input[name=kind]:checked").value === "chat";
}

function endpoint() {
  return chat() ? "/v1/chat/completions" : "/v1/completions";
}

function requestBody(control, stream) {
  const body = { model: state.model ? state.model.id : "" };
  const prompt = $("prompt").value;
  if (chat()) body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  for (const field of ["max_tokens", "temperature", "seed"]) {
    const value = number(field);
    if (value !== undefined) body[field] = value;
  }
  if (stream) body.stream = true;
  body.control = control;
  return body;
}

// ---------------------------------------------------------------- streaming an answer

function part(panel, role) {
  return panel.querySelector("[data-role=" + role + "]");
}

function resetPanel(panel) {
  part(panel, "text").textContent = "";
  part(panel, "status").textContent = "waiting…";
  part(panel, "error").hidden = true;
  part(panel, "error").textContent = "";
  part(panel, "chart").replaceChildren();
  delete state.results[panel.id];
}

// Yields each `data:` payload of a server-sent event stream.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

async function streamAnswer(panel, body, signal) {
  resetPanel(panel);
  panel.classList.add("running");
  const text = part(panel, "text");
  const started = performance.now();
  let control = null;
  let finish = null;
  try {
    const response = await fetch(endpoint(), {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal,
    });
    if (!response.ok) throw await httpError(response);
    part(panel, "status").textContent = "streaming…";
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.param);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const piece = choice.delta ? choice.delta.content : choice.text;
      if (piece) text.textContent += piece;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (choice.control) control = choice.control;
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    part(panel, "status").textContent = (control ? control.tokens_generated + " tokens · " : "") +
      "finish: " + (finish || "?") + " · " + seconds + " s";
    if (control) state.results[panel.id] = control;
  } catch (err) {
    part(panel, "status").textContent = "";
    part(panel, "error").textContent = describe(err);
    part(panel, "error").hidden = false;
    markInvalid(err.param);
  } finally {
    panel.classList.remove("running");
  }
}

// Outline the input a 400 names (control.weights.positive, control.top_k, max_tokens, ...).
function markInvalid(param) {
  if (!param) return;
  const name = param.replace(/^control\./, "");
  const id = name.startsWith("weights.") ? "wn-" + name.slice(8)
    : ["messages", "prompt"].includes(name.split(".")[0]) ? "prompt" : name;
  const input = $(id);
  if (input) input.setAttribute("aria-invalid", "true");
}

async function run(event) {
  if (event) event.preventDefault();
  if (!state.model) return load();
  stop();
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  if (number("seed") === undefined) $("seed").value = Math.floor(Math.random() * 1e6);
  refresh();
  const abort = new AbortController();
  state.abort = abort;
  $("run").disabled = true;
  $("stop").disabled = false;
  part($("steered"), "mode").textContent = "mode: " + $("mode").value;
  const answers = [["plain", plainControl()], ["steered", steeredControl()]].map(
    ([id, control]) => streamAnswer($(id), requestBody(control, true), abort.signal).then(drawCharts));
  await Promise.all(answers);
  if (state.abort === abort) {
    state.abort = null;
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

function stop() {
  if (state.abort) state.abort.abort();
  state.abort = null;
  $("run").disabled = !state.model;
  $("stop").disabled = true;
}

// ---------------------------------------------------------------- what the scorer reported

// One horizontal bar per number; rows that compare across answers share a scale.
function bar(label, value, lo, hi, opts) {
  const row = document.createElement("div");
  row.className = "bar-row" + (opts.cls ? " " + opts.cls : "");
  row.dataset.metric = label;
  row.dataset.value = String(value);
  const name = document.createElement("span");
  name.className = "bar-name";
  name.textContent = label;
  if (opts.note) {
    const note = document.createElement("small");
    note.textContent = " " + opts.note;
    name.append(note);
  }
  const track = document.createElement("span");
  track.className = "bar-track";
  const fill = document.createElement("span");
  fill.className = "bar-fill" + (value < 0 ? " negative" : "");
  const span = hi - lo || 1;
  const zero = (0 - lo) / span;
  const at = (value - lo) / span;
  fill.style.left = (100 * Math.min(zero, at)) + "%";
  fill.style.width = (100 * Math.abs(at - zero)) + "%";
  const axis = document.createElement("span");
  axis.className = "bar-zero";
  axis.style.left = (100 * zero) + "%";
  track.append(fill, axis);
  const num = document.createElement("span");
  num.className = "bar-value";
  num.textContent = value.toFixed(3);
  row.append(name, track, num);
  return row;
}

function extent(values, extra) {
  const all = values.concat(extra || [], [0]);
  return [Math.min(...all), Math.max(...all)];
}

function drawCharts() {
  const results = Object.values(state.results);
  const w = weights();
  for (const [id, control] of Object.entries(state.results)) {
    const chart = part($(id), "chart");
    chart.replaceChildren();
    const title = document.createElement("p");
    title.className = "chart-title";
    title.textContent = "scorer values (reward units)";
    chart.append(title);
    for (const head of state.scorer.heads) {
      const value = control.values[head.name];
      if (value === undefined) continue;
      const [lo, hi] = extent(results.map((c) => c.values[head.name] ?? 0), head.reward_range);
      chart.append(bar(head.name, value, lo, hi,
                       { cls: w[head.name] ? "weighted" : "", note: w[head.name] ? "w " + w[head.name] : "" }));
    }
    const [clo, chi] = extent(results.map((c) => c.combined));
    chart.append(bar("combined", control.combined, clo, chi, { cls: "combined" }));
    const [, khi] = extent(results.map((c) => c.kl));
    chart.append(bar("KL", control.kl, 0, khi || 1, { cls: "kl" }));
    if (control.selections) {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = control.selections + " selections";
      chart.append(p);
    }
  }
}

// ---------------------------------------------------------------- copy as curl / Python

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

function jsonBody(body) {
  const lines = Object.entries(body).map(([k, v]) => "  " + JSON.stringify(k) + ": " + JSON.stringify(v));
  return "{\n" + lines.join(",\n") + "\n}";
}

function py(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return "[" + value.map(py).join(", ") + "]";
  if (typeof value === "object") {
    return "{" + Object.entries(value).map(([k, v]) => JSON.stringify(k) + ": " + py(v)).join(", ") + "}";
  }
  if (typeof value === "number" && !Number.isFinite(value)) return "float(" + JSON.stringify(String(value)) + ")";
  return JSON.stringify(value);  // a JSON string or number is a Python literal too
}

function curlSnippet(body) {
  const lines = ["curl -s " + location.origin + endpoint() + " \\", "  -H \"Content-Type: application/json\" \\"];
  if (state.apiKey) lines.push("  -H \"Authorization: Bearer $CDSERVE_API_KEY\" \\");
  lines.push("  -d " + shellQuote(jsonBody(body)));
  return lines.join("\n");
}

function pythonSnippet(body) {
  const args = Object.entries(body).filter(([k]) => k !== "control")
    .map(([k, v]) => "    " + k + "=" + py(v) + ",");
  args.push("    extra_body={\"control\": " + py(body.control) + "},");
  const call = chat() ? "client.chat.completions.create" : "client.completions.create";
  const text = chat() ? "r.choices[0].message.content" : "r.choices[0].text";
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    "client = OpenAI(base_url=" + JSON.stringify(location.origin + "/v1") +
      ", api_key=os.environ.get(\"CDSERVE_API_KEY\", \"unused\"))",
    "r = " + call + "(",
    ...args,
    ")",
    "print(" + text + ")",
    "print(r.choices[0].model_extra[\"control\"])",
  ].join("\n");
}

// Re-derives everything that depends on the form: which controls show, the snippet.
function refresh() {
  for (const el of document.querySelectorAll("[data-modes]")) el.hidden = !shown(el);
  $("mode-help").textContent = MODE_HELP[$("mode").value] || "";
  if (!state.scorer) return;
  const body = requestBody(steeredControl(), false);
  const as = document.querySelector("input[name=copy-as]:checked").value;
  $("snippet").textContent = as === "curl" ? curlSnippet(body) : pythonSnippet(body);
  $("copied").textContent = state.apiKey ? "the key is read from $CDSERVE_API_KEY" : "";
}

async function copySnippet() {
  const text = $("snippet").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // No clipboard API (a page served over plain HTTP from another host): select and copy.
    const range = document.createRange();
    range.selectNodeContents($("snippet"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    document.execCommand("copy");
  }
  $("copied").textContent = "copied";
}

// ---------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", run);
  $("form").addEventListener("input", refresh);
  $("form").addEventListener("change", refresh);
  $("stop").addEventListener("click", stop);
  $("copy").addEventListener("click", copySnippet);
  for (const r of document.querySelectorAll("input[name=copy-as]")) r.addEventListener("change", refresh);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(e);
  });
  $("api-key").addEventListener("input", () => {
    state.apiKey = $("api-key").value.trim();
    refresh();
  });
  $("api-key").addEventListener("change", () => { if (!state.scorer) load(); });
  $("key-form").addEventListener("submit", (e) => { e.preventDefault(); if (!state.scorer) load(); });
  refresh();
  load();
});
