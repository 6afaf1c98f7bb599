// tunesmith playground: plain JS, no build step, talks to the same server's /v1 API.
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY_STORE = "tunesmith.apiKey";
const MODEL_STORE = "tunesmith.model";
const state = {
  authRequired: false,
  models: [],
  writeAbort: null,
  chatAbort: null,
  chat: [],
  selectedJob: null,
  jobTimer: null,
  listTimer: null,
};

// ---------------------------------------------------------------------------------------------
// API helpers

function authHeaders() {
  const key = localStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || ("HTTP " + status));
    this.status = status;
    this.param = err.param || null;
    this.code = err.code || null;
  }
}

async function api(path, options = {}) {
  const opts = { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } };
  if (opts.json !== undefined) {
    opts.body = JSON.stringify(opts.json);
    opts.headers["Content-Type"] = "application/json";
    delete opts.json;
  }
  const res = await fetch(path, opts);
  let body = null;
  const text = await res.text();
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!res.ok) {
    const err = new ApiError(res.status, body);
    if (res.status === 401) needKey(err.message);
    throw err;
  }
  return body;
}

// POST a streaming request and call onData(obj) for each SSE `data:` object until [DONE].
async function streamSSE(path, payload, onData, signal) {
  const res = await fetch(path, {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(payload),
    signal,
  });
  if (!res.ok) {
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON */ }
    const err = new ApiError(res.status, body);
    if (res.status === 401) needKey(err.message);
    throw err;
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(400, obj);
        onData(obj);
      }
    }
  }
}

function showBanner(message) {
  const el = $("#banner");
  if (!message) { el.classList.add("hidden"); el.textContent = ""; return; }
  el.textContent = message;
  el.classList.remove("hidden");
}

function needKey(message) {
  const box = $("#keybox");
  box.classList.remove("hidden");
  box.classList.add("needed");
  showBanner((message || "This server needs an API key.") + " Enter the key in the field at the top right.");
}

// ---------------------------------------------------------------------------------------------
// Tabs and settings

function switchView(view) {
  for (const tab of document.querySelectorAll(".tab")) {
    const on = tab.dataset.view === view;
    tab.classList.toggle("active", on);
    tab.setAttribute("aria-selected", on ? "true" : "false");
  }
  for (const name of ["write", "chat", "jobs"]) $("#view-" + name).classList.toggle("hidden", name !== view);
  $("#settings").classList.toggle("hidden", view === "jobs");
  $("#layout").classList.toggle("wide", view === "jobs");
  if (view === "jobs") { refreshJobs(); startListPolling(); } else { stopListPolling(); }
  history.replaceState(null, "", "#" + view);
}

function bindSlider(id, digits) {
  const input = $("#" + id);
  const out = $("#" + id + "-val");
  const show = () => { out.textContent = Number(input.value).toFixed(digits); };
  input.addEventListener("input", show);
  show();
}

function sampling() {
  const body = {
    model: $("#model").value,
    temperature: Number($("#temperature").value),
    max_tokens: Number($("#max-tokens").value),
    top_p: Number($("#top-p").value),
  };
  const stop = $("#stop").value.replace(/\\n/g, "\n");
  if (stop) body.stop = [stop];
  const seed = $("#seed").value;
  if (seed !== "") body.seed = Number(seed);
  if (copyingWanted()) body.tunesmith = { check_copying: true };
  return body;
}

// ---------------------------------------------------------------------------------------------
// Copied text: the server finds it (the tunesmith.check_copying option); the page marks it

function selectedKind() {
  const m = state.models.find((x) => x.id === $("#model").value);
  return m ? (m.kind || "base") : "base";
}

// classify or regress for a classifier/regressor run (answered by /v1/classifications), else null
function selectedTask() {
  const m = state.models.find((x) => x.id === $("#model").value);
  return (m && m.task) || null;
}

// A classifier or regressor run labels text: the Write view shows the classify box instead of the prompt.
function updateTaskView() {
  const task = selectedTask();
  $("#classify-card").classList.toggle("hidden", !task);
  $("#prompt-card").classList.toggle("hidden", !!task);
  $("#output-card").classList.toggle("hidden", !!task);
  if (!task) return;
  $("#classify-title").textContent = task === "regress" ? "Score" : "Classify";
  $("#classify").textContent = task === "regress" ? "Score" : "Classify";
  $("#classify-hint").textContent = task === "regress"
    ? "This run is a regressor: it gives each text a score instead of writing. One text per line."
    : "This run is a classifier: it labels text with probabilities instead of writing. One text per line.";
}

function classifyResult(text, item) {
  const li = document.createElement("li");
  li.className = "classify-item";
  const quote = document.createElement("div");
  quote.className = "classify-text";
  quote.textContent = text;
  li.appendChild(quote);
  if (item.score !== undefined) {
    const score = document.createElement("div");
    score.className = "classify-score";
    score.textContent = "score " + item.score.toFixed(3);
    li.appendChild(score);
    return li;
  }
  const probs = Object.entries(item.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of probs) {
    const row = document.createElement("div");
    row.className = "prob-row" + (label === item.label ? " top" : "");
    const name = document.createElement("span");
    name.className = "prob-label";
    name.textContent = label;
    const meter = document.createElement("meter");
    meter.min = 0; meter.max = 1; meter.value = p;
    meter.setAttribute("aria-label", label);
    const value = document.createElement("span");
    value.className = "prob-value";
    value.textContent = (100 * p).toFixed(1) + "%";
    row.append(name, meter, value);
    li.appendChild(row);
  }
  return li;
}

async function classify() {
  const texts = $("#classify-input").value.split("\n").map((t) => t.trim()).filter((t) => t);
  const list = $("#classify-results");
  if (!texts.length) { $("#classify-stats").textContent = "write a text first"; return; }
  $("#classify").disabled = true;
  $("#classify-stats").textContent = "loading model…";
  showBanner("");
  const started = performance.now();
  try {
    const res = await api("/v1/classifications", { method: "POST", json: { model: $("#model").value, input: texts } });
    list.textContent = "";
    for (const item of res.data) list.appendChild(classifyResult(texts[item.index], item));
    const secs = (performance.now() - started) / 1000;
    $("#classify-stats").textContent = texts.length + (texts.length === 1 ? " text" : " texts") + " · " + secs.toFixed(2) + " s";
  } catch (err) {
    $("#classify-stats").textContent = "";
    showBanner(err.message);
  } finally {
    $("#classify").disabled = false;
  }
}

function copyingWanted() {
  const box = $("#check-copying");
  return box.checked && !box.disabled;
}

// A base model has no training text to compare with: the option is only for fine-tuned models.
function updateCopyingToggle() {
  const base = selectedKind() === "base";
  $("#check-copying").disabled = base;
  $("#copying-hint").textContent = base
    ? "Pick a fine-tuned model or a run: a base model has no training text to compare with."
    : "Marks text copied word for word from the model's training text; hover a mark to see where it is in the book.";
}

function describeLocation(where) {
  const lines = where.end_line && where.end_line !== where.line
    ? "lines " + where.line + "–" + where.end_line : "line " + where.line;
  return where.file + ", " + lines + (where.heading ? " (" + where.heading + ")" : "");
}

function describeSpan(span) {
  const times = span.count === 1 ? "once" : span.count.toLocaleString() + " times";
  const where = span.locations.length ? span.locations.map(describeLocation).join("; ") : "the training text";
  return "Copied from " + where + " — " + span.n_words + " words, " + span.n_tokens + " tokens, " +
    times + " in the training text";
}

// Replace el's text with the same text, each copied region in a <mark> that tells where it is from.
// Offsets count Unicode code points, as the server counts them.
function markCopies(el, text, copying) {
  const chars = Array.from(text);
  const regions = [];
  for (const span of [...copying.spans].sort((a, b) => a.start - b.start)) {
    const last = regions[regions.length - 1];
    if (last && span.start <= last.end) {
      last.end = Math.max(last.end, span.end);
      last.spans.push(span);
    } else {
      regions.push({ start: span.start, end: span.end, spans: [span] });
    }
  }
  el.textContent = "";
  let pos = 0;
  for (const r of regions) {
    if (r.start > pos) el.append(chars.slice(pos, r.start).join(""));
    const mark = document.createElement("mark");
    mark.className = "copied";
    mark.tabIndex = 0;
    mark.dataset.source = r.spans.map(describeSpan).join("\n");
    mark.textContent = chars.slice(r.start, r.end).join("");
    el.append(mark);
    pos = r.end;
  }
  if (pos < chars.length) el.append(chars.slice(pos).join(""));
}

function copyingSummary(copying) {
  if (!copying.spans.length) return "nothing copied";
  const longest = copying.longest;
  let text = "copied " + (100 * copying.copy_rate).toFixed(1) + "% · longest " + longest.n_words + " words";
  if (longest.locations.length) text += " (" + describeLocation(longest.locations[0]) + ")";
  return text;
}

async function loadModels(select) {
  try {
    const res = await api("/v1/models");
    state.models = res.data;
  } catch (err) {
    $("#model-hint").textContent = "Could not list models: " + err.message;
    return;
  }
  const modelSel = $("#model");
  const current = select || modelSel.value || localStorage.getItem(MODEL_STORE);
  modelSel.textContent = "";
  const groups = [["base", "Base models"], ["fine-tune", "Fine-tuned"], ["run", "Runs"]];
  for (const [kind, label] of groups) {
    const items = state.models.filter((m) => (m.kind || "base") === kind);
    if (!items.length) continue;
    const group = document.createElement("optgroup");
    group.label = label;
    for (const m of items) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id;
      group.appendChild(opt);
    }
    modelSel.appendChild(group);
  }
  if (current && state.models.some((m) => m.id === current)) modelSel.value = current;
  updateCopyingToggle();
  updateTaskView();
  const n = state.models.length;
  $("#model-hint").textContent = n ? n + " model" + (n === 1 ? "" : "s") + " available" : "No models found.";
  const baseSel = $("#job-base");
  const prevBase = baseSel.value;
  baseSel.textContent = "";
  for (const m of state.models.filter((m) => (m.kind || "base") === "base")) {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = m.id;
    baseSel.appendChild(opt);
  }
  if (prevBase) baseSel.value = prevBase;
}

// ---------------------------------------------------------------------------------------------
// Write (completions)

async function generate() {
  const prompt = $("#prompt").value;
  const out = $("#output");
  out.textContent = "";
  if ($("#show-prompt").checked && prompt) {
    const p = document.createElement("span");
    p.className = "prompt-text";
    p.textContent = prompt;
    out.appendChild(p);
  }
  const gen = document.createElement("span");
  gen.className = "gen-text";
  gen.id = "gen-text";
  out.appendChild(gen);
  const cursor = document.createElement("span");
  cursor.className = "cursor";
  out.appendChild(cursor);

  const controller = new AbortController();
  state.writeAbort = controller;
  $("#generate").disabled = true;
  $("#stop-gen").disabled = false;
  $("#write-stats").textContent = "loading model…";
  showBanner("");
  const started = performance.now();
  let first = 0;
  let pieces = 0;
  let finish = "";
  let usage = null;
  let copying = null;
  try {
    await streamSSE("/v1/completions", {
      ...sampling(), prompt, stream: true, stream_options: { include_usage: true },
    }, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.text) {
        if (!first) first = performance.now();
        gen.textContent += choice.text;
        pieces += 1;
        $("#write-stats").textContent = pieces + " chunks…";
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      if (choice.tunesmith && choice.tunesmith.copying) copying = choice.tunesmith.copying;
    }, controller.signal);
    const secs = (performance.now() - (first || started)) / 1000;
    const toks = usage ? usage.completion_tokens : pieces;
    let stats = toks + " tokens · " + (secs > 0 ? (toks / secs).toFixed(1) : "–") +
      " tok/s · finish: " + (finish || "?");
    if (copying) {
      markCopies(gen, gen.textContent, copying);
      stats += " · " + copyingSummary(copying);
    }
    $("#write-stats").textContent = stats;
  } catch (err) {
    if (err.name === "AbortError") {
      $("#write-stats").textContent = "stopped";
    } else {
      $("#write-stats").textContent = "";
      showBanner(err.message);
    }
  } finally {
    cursor.remove();
    state.writeAbort = null;
    $("#generate").disabled = false;
    $("#stop-gen").disabled = true;
  }
}

// ---------------------------------------------------------------------------------------------
// Chat

function addMessage(role, text) {
  $("#chat-empty").classList.add("hidden");
  const div = document.createElement("div");
  div.className = "msg " + role;
  const r = document.createElement("span");
  r.className = "msg-role";
  r.textContent = role === "user" ? "you" : role;
  const body = document.createElement("span");
  body.className = "msg-body";
  body.textContent = text;
  div.append(r, body);
  $("#messages").appendChild(div);
  $("#messages").scrollTop = $("#messages").scrollHeight;
  return body;
}

async function sendChat(ev) {
  if (ev) ev.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text || state.chatAbort) return;
  input.value = "";
  state.chat.push({ role: "user", content: text });
  addMessage("user", text);
  const body = addMessage("assistant", "");
  const messages = [];
  const system = $("#system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.chat);
  const controller = new AbortController();
  state.chatAbort = controller;
  $("#send").disabled = true;
  $("#stop-chat").disabled = false;
  showBanner("");
  let reply = "";
  let copying = null;
  try {
    await streamSSE("/v1/chat/completions", { ...sampling(), messages, stream: true }, (chunk) => {
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        body.textContent = reply;
        $("#messages").scrollTop = $("#messages").scrollHeight;
      }
      if (choice && choice.tunesmith && choice.tunesmith.copying) copying = choice.tunesmith.copying;
    }, controller.signal);
    if (copying) {
      markCopies(body, reply, copying);
      const note = document.createElement("span");
      note.className = "msg-note";
      note.textContent = copyingSummary(copying);
      body.parentElement.append(note);
    }
  } catch (err) {
    if (err.name !== "AbortError") {
      body.parentElement.className = "msg error";
      body.textContent = err.message;
    }
  } finally {
    if (reply) state.chat.push({ role: "assistant", content: reply });
    state.chatAbort = null;
    $("#send").disabled = false;
    $("#stop-chat").disabled = true;
  }
}

function clearChat() {
  state.chat = [];
  for (const el of document.querySelectorAll("#messages .msg")) el.remove();
  $("#chat-empty").classList.remove("hidden");
}

// ---------------------------------------------------------------------------------------------
// Fine-tuning jobs

// The statuses after which a job never changes: the server says which (GET /config).
const TERMINAL = new Set();

function fmtTime(ts) {
  if (!ts) return "";
  const d = new Date(ts * 1000);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

function badge(el, status) {
  el.className = "badge " + status;
  el.textContent = status;
}

async function refreshJobs() {
  let res;
  try { res = await api("/v1/fine_tuning/jobs?limit=50"); } catch (err) { return; }
  const list = $("#job-list");
  list.textContent = "";
  if (!res.data.length) {
    const li = document.createElement("li");
    li.className = "placeholder";
    li.textContent = "No jobs yet. Upload a text to start one.";
    list.appendChild(li);
    return;
  }
  for (const job of res.data) {
    const li = document.createElement("li");
    li.className = "job-item" + (job.id === state.selectedJob ? " selected" : "");
    li.dataset.id = job.id;
    const left = document.createElement("div");
    left.className = "job-text";
    const name = document.createElement("div");
    name.className = "job-name";
    name.textContent = job.fine_tuned_model || job.id;
    const meta = document.createElement("div");
    meta.className = "job-meta";
    meta.textContent = job.model + " · " + new Date(job.created_at * 1000).toLocaleString();
    left.append(name, meta);
    const b = document.createElement("span");
    badge(b, job.status);
    li.append(left, b);
    li.addEventListener("click", () => selectJob(job.id));
    list.appendChild(li);
  }
}

function startListPolling() {
  stopListPolling();
  state.listTimer = setInterval(refreshJobs, 3000);
}

function stopListPolling() {
  if (state.listTimer) clearInterval(state.listTimer);
  state.listTimer = null;
}

async function selectJob(id) {
  state.selectedJob = id;
  for (const li of document.querySelectorAll(".job-item")) li.classList.toggle("selected", li.dataset.id === id);
  $("#job-detail").classList.remove("hidden");
  if (state.jobTimer) clearTimeout(state.jobTimer);
  await pollJob();
}

async function pollJob() {
  const id = state.selectedJob;
  if (!id) return;
  let job, metrics, events;
  try {
    [job, metrics, events] = await Promise.all([
      api("/v1/fine_tuning/jobs/" + id),
      api("/v1/fine_tuning/jobs/" + id + "/metrics"),
      api("/v1/fine_tuning/jobs/" + id + "/events?limit=200"),
    ]);
  } catch (err) {
    showBanner(err.message);
    return;
  }
  if (id !== state.selectedJob) return;
  $("#jd-title").textContent = job.id;
  $("#jd-model").textContent = job.fine_tuned_model || ("base " + job.model + (job.user_provided_suffix ? " · suffix " + job.user_provided_suffix : ""));
  badge($("#jd-status"), job.status);
  $("#jd-cancel").classList.toggle("hidden", TERMINAL.has(job.status));
  $("#jd-use").classList.toggle("hidden", job.status !== "succeeded");
  // Job metrics carry OpenAI's names for the losses and accuracies (tunesmith/events.py, JOB_METRIC_NAMES).
  const train = metrics.data.filter((m) => m.train_loss !== undefined && m.train_loss !== null);
  const valid = metrics.data.filter((m) => m.valid_loss !== undefined && m.valid_loss !== null);
  const last = train[train.length - 1];
  const total = last && last.total_steps;
  const pct = job.status === "succeeded" ? 100 : (last && total ? Math.round((100 * last.step) / total) : 0);
  $("#jd-progress").style.width = pct + "%";
  const parts = [];
  if (last) parts.push("step " + last.step + (total ? "/" + total : ""), "loss " + last.train_loss.toFixed(3));
  if (valid.length) parts.push("validation loss " + valid[valid.length - 1].valid_loss.toFixed(3));
  if (job.trained_tokens) parts.push(job.trained_tokens.toLocaleString() + " tokens");
  const hp = job.hyperparameters || {};
  parts.push("epochs " + hp.n_epochs + ", batch " + hp.batch_size);
  if (job.error) parts.push("error: " + job.error.message);
  $("#jd-summary").textContent = parts.join(" · ");
  drawChart($("#loss-chart"), train, valid, total);
  const list = $("#jd-events");
  list.textContent = "";
  for (const e of events.data) {
    const li = document.createElement("li");
    const t = document.createElement("time");
    t.textContent = fmtTime(e.created_at);
    const m = document.createElement("span");
    m.className = "ev-msg lvl-" + e.level;
    m.textContent = e.message;
    li.append(t, m);
    list.appendChild(li);
  }
  if (!TERMINAL.has(job.status)) {
    state.jobTimer = setTimeout(pollJob, 1500);
  } else {
    refreshJobs();
    if (job.status === "succeeded") loadModels();
  }
}

// 1, 2, 5, 10, 20, 50, ... : the smallest "round" integer at least `raw`.
function niceStep(raw) {
  if (raw <= 1) return 1;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// A small line chart: training loss as a line, validation loss as a line with dots.
function drawChart(canvas, train, valid, totalSteps) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 640;
  const h = canvas.clientHeight || 260;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const muted = cssVar("--muted");
  const border = cssVar("--border");
  ctx.font = "12px system-ui, sans-serif";
  const pts = train.map((m) => [m.step, m.train_loss]).concat(valid.map((m) => [m.step, m.valid_loss]));
  if (!pts.length) {
    ctx.fillStyle = muted;
    ctx.textAlign = "center";
    ctx.fillText("The loss curve appears when training starts.", w / 2, h / 2);
    return;
  }
  const pad = { l: 48, r: 16, t: 28, b: 42 };
  const xmax = Math.max(totalSteps || 0, ...pts.map((p) => p[0]), 1);
  let ymin = Math.min(...pts.map((p) => p[1]));
  let ymax = Math.max(...pts.map((p) => p[1]));
  if (ymax - ymin < 1e-6) { ymax += 0.5; ymin -= 0.5; }
  const span = ymax - ymin;
  ymin -= span * 0.08;
  ymax += span * 0.08;
  const X = (s) => pad.l + (s / xmax) * (w - pad.l - pad.r);
  const Y = (v) => pad.t + (1 - (v - ymin) / (ymax - ymin)) * (h - pad.t - pad.b);
  ctx.strokeStyle = border;
  ctx.fillStyle = muted;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const digits = ymax - ymin < 0.1 ? 3 : ymax - ymin < 10 ? 2 : 1;
  for (let i = 0; i <= 4; i++) {
    const v = ymin + ((ymax - ymin) * i) / 4;
    const y = Y(v);
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(w - pad.r, y); ctx.stroke();
    ctx.fillText(v.toFixed(digits), pad.l - 6, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const stepTick = niceStep(xmax / 5);
  for (let s = 0; s <= xmax + 1e-9; s += stepTick) ctx.fillText(String(s), X(s), h - pad.b + 6);
  ctx.fillText("step", pad.l + (w - pad.l - pad.r) / 2, h - 16);
  ctx.textAlign = "left";
  ctx.fillText("loss", 6, 4);
  const line = (series, color, dots) => {
    if (!series.length) return;
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    series.forEach(([s, v], i) => (i ? ctx.lineTo(X(s), Y(v)) : ctx.moveTo(X(s), Y(v))));
    ctx.stroke();
    if (dots || series.length === 1) {
      for (const [s, v] of series) { ctx.beginPath(); ctx.arc(X(s), Y(v), 3, 0, Math.PI * 2); ctx.fill(); }
    }
  };
  line(train.map((m) => [m.step, m.train_loss]), cssVar("--accent"), false);
  line(valid.map((m) => [m.step, m.valid_loss]), cssVar("--valid"), true);
}

async function startJob(ev) {
  ev.preventDefault();
  const fileInput = $("#train-file");
  const errEl = $("#job-error");
  errEl.classList.add("hidden");
  if (!fileInput.files.length) { errEl.textContent = "Choose a training file first."; errEl.classList.remove("hidden"); return; }
  const status = $("#job-form-status");
  $("#start-job").disabled = true;
  try {
    status.textContent = "uploading…";
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", fileInput.files[0]);
    const file = await api("/v1/files", { method: "POST", body: form });
    status.textContent = "creating job…";
    const hyperparameters = {};
    const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));
    if (num("#job-epochs") !== undefined) hyperparameters.n_epochs = num("#job-epochs");
    if (num("#job-batch") !== undefined) hyperparameters.batch_size = num("#job-batch");
    if (num("#job-lr") !== undefined) hyperparameters.learning_rate_multiplier = num("#job-lr");
    const body = { model: $("#job-base").value, training_file: file.id, hyperparameters };
    const suffix = $("#job-suffix").value.trim();
    if (suffix) body.suffix = suffix;
    const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
    status.textContent = "started " + job.id;
    await refreshJobs();
    await selectJob(job.id);
  } catch (err) {
    status.textContent = "";
    errEl.textContent = err.message;
    errEl.classList.remove("hidden");
  } finally {
    $("#start-job").disabled = false;
  }
}

async function cancelJob() {
  if (!state.selectedJob) return;
  try {
    await api("/v1/fine_tuning/jobs/" + state.selectedJob + "/cancel", { method: "POST" });
  } catch (err) {
    showBanner(err.message);
  }
  pollJob();
}

async function useModel() {
  const job = await api("/v1/fine_tuning/jobs/" + state.selectedJob);
  if (!job.fine_tuned_model) return;
  await loadModels(job.fine_tuned_model);
  $("#model").value = job.fine_tuned_model;
  localStorage.setItem(MODEL_STORE, job.fine_tuned_model);
  updateCopyingToggle();
  switchView("write");
}

// ---------------------------------------------------------------------------------------------
// Start up

async function init() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => switchView(tab.dataset.view));
  bindSlider("temperature", 2);
  bindSlider("max-tokens", 0);
  bindSlider("top-p", 2);
  $("#generate").addEventListener("click", generate);
  $("#stop-gen").addEventListener("click", () => state.writeAbort && state.writeAbort.abort());
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
  });
  $("#copy-output").addEventListener("click", () => {
    const text = $("#output").innerText;
    if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
  });
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) sendChat(e);
  });
  $("#stop-chat").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());
  $("#clear-chat").addEventListener("click", clearChat);
  $("#job-form").addEventListener("submit", startJob);
  $("#refresh-jobs").addEventListener("click", refreshJobs);
  $("#jd-cancel").addEventListener("click", cancelJob);
  $("#jd-use").addEventListener("click", useModel);
  $("#model").addEventListener("change", () => {
    localStorage.setItem(MODEL_STORE, $("#model").value);
    updateCopyingToggle();
    updateTaskView();
  });
  $("#classify").addEventListener("click", classify);
  $("#classify-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) classify();
  });
  $("#api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("#save-key").addEventListener("click", () => {
    const key = $("#api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    $("#keybox").classList.remove("needed");
    showBanner("");
    loadModels();
    if (!$("#view-jobs").classList.contains("hidden")) refreshJobs();
  });
  $("#api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") $("#save-key").click(); });
  window.addEventListener("resize", () => { if (state.selectedJob) pollJob(); });

  try {
    const cfg = await (await fetch("/config")).json();
    state.authRequired = cfg.auth_required;
    if (cfg.auth_required) $("#keybox").classList.remove("hidden");
    if (cfg.max_tokens) $("#max-tokens").max = cfg.max_tokens;
    if (cfg.max_upload_bytes) $("#max-upload").textContent = Math.round(cfg.max_upload_bytes / 1048576) + " MB";
    for (const status of cfg.job_final_statuses || []) TERMINAL.add(status);
  } catch (_) { /* an older server: carry on */ }
  if (state.authRequired && !localStorage.getItem(KEY_STORE)) needKey("This server needs an API key.");
  const start = (location.hash || "#write").slice(1);
  switchView(["write", "chat", "jobs"].includes(start) ? start : "write");
  await loadModels();
}

document.addEventListener("DOMContentLoaded", init);
