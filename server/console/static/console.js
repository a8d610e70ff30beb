// The console's page: sessions, documents read with their live loss curve, chat beside the base model.
// Only the public HTTP API is used (api.js); no framework, no build step.

import { ApiError, apiKey, events, getJson, isAbort, request, sendJson, whenUnauthorized } from "./api.js";
import { LossCurve } from "./curve.js";

const $ = (selector) => document.querySelector(selector);
const VIEWS = ["sessions", "read", "chat"];
const state = { model: null, needsKey: false, sessions: [], settings: null };

function element(tag, attributes = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const sessionPath = (id, tail = "") => `/v1/sessions/${encodeURIComponent(id)}${tail}`;

function formatBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

const formatLoss = (v) => (v === null || v === undefined || !Number.isFinite(v) ? "" : v.toFixed(3));

// ---- notices ----------------------------------------------------------------------------------------

let noticeTimer = null;

// An error stays until the next notice; news of a success fades after a few seconds.
function notify(message, kind = "error") {
  const notice = $("#notice");
  notice.textContent = message;
  notice.className = kind;
  notice.hidden = !message;
  clearTimeout(noticeTimer);
  if (message && kind === "ok") noticeTimer = setTimeout(() => { notice.hidden = true; }, 4000);
}

// For screen readers: an upload or an answer that ends (the panes themselves are not live: a token at a time
// would flood them).
function announce(message) {
  $("#announce").textContent = message;
}

function failed(error) {
  if (isAbort(error)) return;
  if (error instanceof ApiError && error.status === 401) return; // the key prompt says it
  notify(error.message || String(error));
}

// ---- views and the key --------------------------------------------------------------------------------

function currentView() {
  const view = location.hash.slice(1);
  return VIEWS.includes(view) ? view : "sessions";
}

function show() {
  const asking = state.needsKey && !apiKey.get();
  const view = asking ? "key" : currentView();
  for (const v of [...VIEWS, "key"]) $(`#${v}-view`).hidden = v !== view;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (asking) $("#key-input").focus();
}

function askForKey(message) {
  apiKey.clear();
  const error = $("#key-error");
  error.textContent = message || "";
  error.hidden = !message;
  show();
}

async function useKey(event) {
  event.preventDefault();
  apiKey.set($("#key-input").value.trim());
  try {
    await loadAll();
    $("#key-input").value = "";
    $("#key-error").hidden = true;
    show();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) failed(error);
  }
}

// ---- sessions ------------------------------------------------------------------------------------------

async function refreshSessions() {
  state.sessions = (await getJson("/v1/sessions")).data;
  renderSessions();
  fillSessionChoices();
}

function actionButton(label, session, handler, className = "secondary", what = `${label} session`) {
  const button = element("button", { type: "button", class: className, "aria-label": `${what} ${session.id}` },
                         label);
  button.addEventListener("click", () => handler(session).catch(failed));
  return button;
}

function renderSessions() {
  const body = $("#sessions tbody");
  body.replaceChildren();
  for (const s of state.sessions) {
    const row = element("tr", { "data-session": s.id });
    row.append(element("th", { scope: "row" }, s.id));
    const pending = s.pending_tokens ? ` (+${s.pending_tokens} waiting)` : "";
    row.append(element("td", { "data-label": "Tokens read" }, `${s.tokens_ingested}${pending}`));
    row.append(element("td", { "data-label": "Chunks" }, String(s.chunks)));
    const loss = s.chunks ? `${formatLoss(s.last_loss_before)} → ${formatLoss(s.last_loss_after)}` : "";
    row.append(element("td", { "data-label": "Last loss" }, loss));
    row.append(element("td", { "data-label": "Fast weights" },
                       `${formatBytes(s.fast_weight_bytes)} (${s.memory})`));
    row.append(element("td", { "data-label": "Where" }, s.residency || ""));
    const actions = element("td", { class: "actions" });
    actions.append(
      actionButton("Read", s, async () => { selectSession(s.id); location.hash = "#read"; }),
      actionButton("Chat", s, async () => { selectSession(s.id); location.hash = "#chat"; }),
      actionButton("Save", s, saveSession),
      actionButton("Reset", s, resetSession),
      actionButton("Adapter", s, downloadAdapter, "secondary", "Download the peft adapter of session"),
      actionButton("Delete", s, deleteSession, "danger"),
    );
    row.append(actions);
    body.append(row);
  }
  $("#no-sessions").hidden = state.sessions.length > 0;
}

function fillSessionChoices() {
  const read = $("#read-session"), chat = $("#chat-model");
  const keepRead = read.value, keepChat = chat.value;
  read.replaceChildren(...state.sessions.map((s) => element("option", { value: s.id }, s.id)));
  chat.replaceChildren(element("option", { value: state.model }, `the base model (${state.model})`),
                       ...state.sessions.map((s) => element("option", { value: s.id }, `session ${s.id}`)));
  if (state.sessions.some((s) => s.id === keepRead)) read.value = keepRead;
  if ([state.model, ...state.sessions.map((s) => s.id)].includes(keepChat)) chat.value = keepChat;
  else if (state.sessions.length) chat.value = state.sessions[0].id;
  chatModelChanged();
}

function selectSession(id) {
  $("#read-session").value = id;
  $("#chat-model").value = id;
  chatModelChanged();
}

function confirmDialog(text, action) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  dialog.querySelector("button[value=yes]").textContent = action;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"),
                                                          { once: true }));
}

async function saveSession(s) {
  await request(sessionPath(s.id, "/save"), { method: "POST" });
  notify(`Session ${s.id} saved.`, "ok");
  await refreshSessions();
}

async function resetSession(s) {
  if (!(await confirmDialog(`Reset session ${s.id}? Everything it learned is forgotten.`, "Reset"))) return;
  await request(sessionPath(s.id, "/reset"), { method: "POST" });
  notify(`Session ${s.id} reset.`, "ok");
  await refreshSessions();
}

async function deleteSession(s) {
  if (!(await confirmDialog(`Delete session ${s.id} and its saved fast weights? This cannot be undone.`,
                            "Delete"))) return;
  await request(sessionPath(s.id), { method: "DELETE" });
  notify(`Session ${s.id} deleted.`, "ok");
  await refreshSessions();
}

async function downloadAdapter(s) {
  const blob = await (await request(sessionPath(s.id, "/adapter"))).blob();
  const link = element("a", { href: URL.createObjectURL(blob), download: `${s.id}-adapter.zip` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

// ---- new sessions: the settings form is built from GET /v1/settings --------------------------------------

const shown = (value) => (Array.isArray(value) ? value.join(", ") : value === null ? "none" : String(value));

function buildSettingsForm() {
  const { presets, memory, fields } = state.settings;
  const select = $("#create-memory");
  select.replaceChildren(...Object.keys(presets).map((name) => element("option", { value: name }, name)));
  select.value = memory;
  const box = $("#advanced-fields");
  box.replaceChildren();
  for (const section of [...new Set(fields.map((f) => f.section))]) {
    const set = element("fieldset");
    set.append(element("legend", {}, section));
    for (const f of fields.filter((x) => x.section === section)) {
      const id = `setting-${f.section}-${f.name}`;
      const label = element("label", { for: id }, f.name);
      const help = element("small", { id: `${id}-help`, class: "muted" }, f.doc);
      let input;
      if (f.type === "boolean") {
        input = element("select", { id });
        input.append(element("option", { value: "" }, "default"), element("option", { value: "true" }, "true"),
                     element("option", { value: "false" }, "false"));
      } else {
        const numeric = f.type.startsWith("integer") || f.type.startsWith("number");
        input = element("input", { id, type: numeric ? "number" : "text", autocomplete: "off" });
        if (numeric) input.step = f.type.startsWith("integer") ? "1" : "any";
        if (f.minimum !== null && Math.abs(f.minimum) < 2 ** 53) input.min = f.minimum;
        if (f.maximum !== null && Math.abs(f.maximum) < 2 ** 53) input.max = f.maximum;
      }
      input.dataset.section = f.section;
      input.dataset.name = f.name;
      input.dataset.type = f.type;
      input.setAttribute("aria-describedby", `${id}-help`);
      const line = element("div", { class: "setting" });
      line.append(label, input, help);
      set.append(line);
    }
    box.append(set);
  }
  presetChanged();
}

function presetChanged() {
  const { presets, defaults } = state.settings;
  const memory = $("#create-memory").value;
  const changes = Object.entries(presets[memory] || {}).flatMap(
    ([section, values]) => Object.entries(values).map(([k, v]) => `${section}.${k} ${shown(v)}`));
  $("#memory-help").textContent = changes.length ? `${memory}: ${changes.join(", ")}` : `${memory}: the defaults`;
  for (const input of document.querySelectorAll("#advanced-fields [data-name]")) {
    const value = shown(defaults[memory][input.dataset.section][input.dataset.name]);
    if (input.tagName === "SELECT") input.options[0].textContent = `default (${value})`;
    else input.placeholder = value;
  }
}

function settingValue(input) {
  const raw = input.value.trim();
  const type = input.dataset.type;
  if (type === "boolean") return raw === "true";
  if (type.startsWith("integer")) return parseInt(raw, 10);
  if (type.startsWith("number")) return parseFloat(raw);
  if (type === "array") {
    const items = raw.split(",").map((x) => x.trim()).filter(Boolean);
    const example = state.settings.defaults[state.settings.memory][input.dataset.section][input.dataset.name];
    return typeof example?.[0] === "number" ? items.map(Number) : items;
  }
  return raw;
}

async function createSession(event) {
  event.preventDefault();
  const settings = { memory: $("#create-memory").value };
  for (const input of document.querySelectorAll("#advanced-fields [data-name]")) {
    if (input.value.trim() === "") continue;
    (settings[input.dataset.section] ||= {})[input.dataset.name] = settingValue(input);
  }
  const id = $("#create-id").value.trim();
  const created = await sendJson("/v1/sessions", { ...(id ? { id } : {}), settings });
  event.target.reset();
  $("#create-memory").value = state.settings.memory;
  presetChanged();
  notify(`Session ${created.id} created.`, "ok");
  await refreshSessions();
  selectSession(created.id);
}

function base64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function importAdapter(event) {
  event.preventDefault();
  const files = [...$("#import-files").files];
  const config = files.find((f) => f.name.endsWith(".json"));
  const weights = files.find((f) => f.name.endsWith(".safetensors"));
  if (!config || !weights) {
    notify("Choose both adapter_config.json and adapter_model.safetensors.");
    return;
  }
  let adapterConfig;
  try {
    adapterConfig = JSON.parse(await config.text());
  } catch {
    notify(`${config.name} is not JSON.`);
    return;
  }
  const id = $("#import-id").value.trim();
  const created = await sendJson("/v1/sessions", {
    ...(id ? { id } : {}), adapter: { adapter_config: adapterConfig, adapter_model: await base64(weights) } });
  event.target.reset();
  notify(`Session ${created.id} imported.`, "ok");
  await refreshSessions();
}

// ---- reading documents ----------------------------------------------------------------------------------

// A file goes in slices: each POST's body reaches the server at once (a browser reads no answer before it has sent
// its body), so the curve moves while a slice trains, and a cancelled file resumes at a slice's edge or inside it.
const SLICE_BYTES = 32 * 1024;
const BUSY_RETRIES = 120; // 409: the server still finishes a cancelled slice (or another feed): wait for it

const curve = new LossCurve($("#curve"), $("#curve-summary"));
const uploads = []; // {name, blob, session, base, sentLast, item, bar, status, button, controller, phase}
let reading = false;

function addUpload(name, blob) {
  const session = $("#read-session").value;
  if (!session) {
    notify("Create a session first (Sessions).");
    return;
  }
  const item = element("li", { class: "upload" });
  const title = element("span", { class: "name" }, `${name} → ${session}`);
  const bar = element("progress", { max: "1", value: "0", "aria-label": `Progress of ${name}` });
  const status = element("span", { class: "status" }, "waiting");
  const button = element("button", { type: "button", class: "secondary" }, "Cancel");
  item.append(title, bar, status, button);
  $("#uploads").append(item);
  // base: bytes of an unfinished document in the session before this file (set when it starts)
  const upload = { name, blob, session, base: null, tokensBefore: null, sentLast: false, item, bar, status, button,
                   controller: null, phase: "waiting" };
  button.addEventListener("click", () => (upload.phase === "cancelled" ? resume(upload) : cancel(upload)));
  uploads.push(upload);
  readNext();
}

function cancel(upload) {
  if (upload.phase === "reading") upload.controller.abort();
  else uploads.splice(uploads.indexOf(upload), 1);
  setPhase(upload, "cancelled", "cancelled: what was read is kept");
}

function resume(upload) {
  setPhase(upload, "waiting", "waiting");
  uploads.push(upload);
  readNext();
}

function setPhase(upload, phase, text) {
  upload.phase = phase;
  upload.status.textContent = text;
  upload.item.dataset.phase = phase;
  upload.button.textContent = phase === "cancelled" ? "Resume" : "Cancel";
  upload.button.setAttribute("aria-label", `${upload.button.textContent} ${upload.name}`);
  upload.button.hidden = phase === "done" || phase === "failed";
}

async function readNext() {
  if (reading) return;
  const upload = uploads.find((u) => u.phase === "waiting");
  if (!upload) return;
  reading = true;
  try {
    await read(upload);
  } finally {
    uploads.splice(uploads.indexOf(upload), 1);
    reading = false;
    refreshSessions().catch(failed);
    readNext();
  }
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Where this file resumes in the session's unfinished document, by the server's own count: read when an attempt
// starts and after a 409 (between slices the client knows it). null when nothing is left to send (the phase says).
async function resync(upload) {
  const info = await getJson(sessionPath(upload.session));
  const held = info.document_bytes;
  if (upload.sentLast && held === 0 && info.tokens_ingested + info.pending_tokens > upload.tokensBefore) {
    // the last slice was taken in and the document ended (a cancel came after it)
    setPhase(upload, "done", "read");
    return null;
  }
  // upload.base: the document's bytes before this file's first byte, known once a slice of it was accepted
  const offset = upload.base === null ? 0 : held - upload.base;
  if (offset < 0 || offset > upload.blob.size) {
    setPhase(upload, "failed", "failed: the session's document changed meanwhile (reset, or another upload)");
    return null;
  }
  return { offset, document: held };
}

// A 409 worth waiting out: another stream still feeds the session (a cancelled slice finishing), or it has moved
// on since we last looked (resync and go on from where it is).
const retryable = (error) =>
  error instanceof ApiError && error.status === 409 && ["session_busy", "document_offset"].includes(error.code);

async function read(upload) {
  upload.controller = new AbortController();
  setPhase(upload, "reading", "reading");
  try {
    let at = await resync(upload);
    if (at === null) return;
    const progress = { tokens: 0, bytes: 0, trained: 0, chunks: 0, start: at.offset }; // this attempt's slices
    for (let tries = 0, done = false; !done; ) {
      const end = Math.min(upload.blob.size, at.offset + SLICE_BYTES);
      try {
        done = await readSlice(upload, at.document, at.offset, end, progress);
        at = { offset: end, document: upload.base + end };
        tries = 0;
      } catch (error) {
        if (!retryable(error) || ++tries > BUSY_RETRIES) throw error;
        await pause(500);
        if ((at = await resync(upload)) === null) return;
      }
    }
  } catch (error) {
    if (isAbort(error)) return; // cancel() said so
    setPhase(upload, "failed", `failed: ${error.message}`);
    failed(error);
  }
}

// One slice [offset, end) of the file, ``documentOffset`` where it starts in the session's unfinished document;
// the document's end with the last one. True once the file is read.
async function readSlice(upload, documentOffset, offset, end, progress) {
  const last = end === upload.blob.size;
  const query = `?document_offset=${documentOffset}&end_of_document=${last}`;
  const response = await request(sessionPath(upload.session, `/documents${query}`), {
    method: "POST", body: upload.blob.slice(offset, end), accept: "text/event-stream",
    signal: upload.controller.signal });
  for await (const event of events(response)) {
    if (event.object === "document.started") {
      upload.base ??= documentOffset - offset; // accepted: from now on the server's count places this file
      upload.tokensBefore ??= event.tokens_ingested + event.pending_tokens;
      if (last) upload.sentLast = true;
    } else if (event.object === "document.chunk") {
      curve.add(event);
      progress.trained += event.tokens;
      progress.chunks += 1;
      // tokens per byte so far tell how many tokens the rest of the file holds
      const rate = (progress.tokens + event.tokens_received) / Math.max(1, progress.bytes + event.bytes_read);
      const doneBytes = progress.start + progress.trained / Math.max(rate, 1e-9);
      upload.bar.value = Math.min(0.99, doneBytes / Math.max(1, upload.blob.size));
      upload.status.textContent = `${progress.chunks} chunks, ${Math.round(event.tokens_per_second)} tokens/s`;
    } else if (event.object === "document.summary") {
      progress.tokens += event.tokens_received;
      progress.bytes += event.bytes_read;
      if (last) {
        upload.bar.value = 1;
        setPhase(upload, "done", `read: ${progress.tokens} tokens, ${progress.chunks} chunks`);
        announce(`${upload.name} read into ${upload.session}: ${progress.tokens} tokens.`);
      }
      return last;
    }
  }
  throw new Error("the server ended the upload without its summary");
}

function readFiles(files) {
  for (const file of files) addUpload(file.name, file);
}

function setUpDropZone() {
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    readFiles(event.dataTransfer.files);
  });
  $("#read-files").addEventListener("change", (event) => {
    readFiles(event.target.files);
    event.target.value = "";
  });
  $("#paste-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("#paste-text").value;
    if (!text) return;
    addUpload("pasted text", new Blob([text], { type: "text/plain" }));
    $("#paste-text").value = "";
  });
}

// ---- chat -------------------------------------------------------------------------------------------------

const conversations = { main: [], base: [] };
let chatting = null; // the AbortController of the answers being streamed

function chatModelChanged() {
  const model = $("#chat-model").value;
  const isBase = model === state.model;
  $("#chat-compare").disabled = isBase;
  $("#pane-main-title").textContent = isBase ? "Base model" : `Session ${model}`;
  $("#pane-base").hidden = isBase || !$("#chat-compare").checked;
}

function samplingSettings() {
  const settings = {
    temperature: parseFloat($("#chat-temperature").value || "0"),
    top_p: parseFloat($("#chat-top-p").value || "1"),
    max_tokens: parseInt($("#chat-max-tokens").value || "128", 10),
  };
  if ($("#chat-seed").value !== "") settings.seed = parseInt($("#chat-seed").value, 10);
  for (const [name, id] of [["presence_penalty", "#chat-presence"], ["frequency_penalty", "#chat-frequency"]]) {
    const value = parseFloat($(id).value || "0");
    if (value) settings[name] = value;
  }
  const stop = $("#chat-stop-texts").value.split("\n").filter((line) => line !== "");
  if (stop.length) settings.stop = stop;
  return settings;
}

function addMessage(list, role, text) {
  const item = element("li", { class: `message ${role}` });
  item.append(element("span", { class: "role" }, role === "user" ? "You" : "Answer"),
              element("div", { class: "text" }, text));
  list.append(item);
  return item.querySelector(".text");
}

async function answer(pane, model, sampling, signal) {
  const list = $(pane === "main" ? "#chat-main" : "#chat-base");
  const messages = conversations[pane];
  const out = addMessage(list, "assistant", "");
  out.dataset.deltas = "0";
  out.setAttribute("aria-busy", "true");
  try {
    const response = await request("/v1/chat/completions", {
      method: "POST", json: { model, messages, stream: true, ...sampling }, accept: "text/event-stream", signal });
    for await (const chunk of events(response)) {
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        out.textContent += delta;
        out.dataset.deltas = String(Number(out.dataset.deltas) + 1);
      }
    }
  } catch (error) {
    if (!isAbort(error)) {
      out.dataset.error = error.message;
      messages.pop(); // the question goes too: the next one is asked without this failed turn
      throw error;
    }
  } finally {
    out.removeAttribute("aria-busy");
  }
  messages.push({ role: "assistant", content: out.textContent }); // stopped early: what came so far
  announce(`${pane === "main" ? $("#pane-main-title").textContent : "Base model"} answered: ${out.textContent}`);
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text || chatting) return;
  const model = $("#chat-model").value;
  const panes = $("#pane-base").hidden ? ["main"] : ["main", "base"];
  for (const pane of panes) {
    conversations[pane].push({ role: "user", content: text });
    addMessage($(pane === "main" ? "#chat-main" : "#chat-base"), "user", text);
  }
  $("#chat-input").value = "";
  chatting = new AbortController();
  $("#chat-send").disabled = true;
  $("#chat-stop").disabled = false;
  const sampling = samplingSettings();
  const results = await Promise.allSettled(
    panes.map((pane) => answer(pane, pane === "main" ? model : state.model, sampling, chatting.signal)));
  chatting = null;
  $("#chat-send").disabled = false;
  $("#chat-stop").disabled = true;
  const failure = results.find((r) => r.status === "rejected");
  if (failure) failed(failure.reason);
}

function clearChat() {
  chatting?.abort();
  conversations.main = [];
  conversations.base = [];
  $("#chat-main").replaceChildren();
  $("#chat-base").replaceChildren();
}

// ---- start -------------------------------------------------------------------------------------------------

async function loadAll() {
  const [models, settings] = await Promise.all([getJson("/v1/models"), getJson("/v1/settings")]);
  state.model = models.data.find((m) => m.parent === null).id;
  state.settings = settings;
  buildSettingsForm();
  await refreshSessions();
}

async function start() {
  const response = await fetch("/readyz");
  if (response.status !== 200) {
    notify("The server is starting…", "ok");
    setTimeout(start, 1000);
    return;
  }
  notify("");
  const ready = await response.json();
  state.needsKey = ready.api_keys;
  $("#model").textContent = `Base model: ${ready.model}`;
  $("#change-key").hidden = !ready.api_keys;
  if (state.needsKey && !apiKey.get()) {
    show();
    return;
  }
  await loadAll();
  show();
}

function on(selector, type, handler) {
  $(selector).addEventListener(type, (event) => Promise.resolve(handler(event)).catch(failed));
}

whenUnauthorized(() => askForKey("The server refused this key: enter a valid one."));
window.addEventListener("hashchange", show);
on("#key-form", "submit", useKey);
on("#change-key", "click", () => askForKey(""));
on("#refresh-sessions", "click", refreshSessions);
on("#create-form", "submit", createSession);
on("#create-memory", "change", presetChanged);
on("#import-form", "submit", importAdapter);
on("#chat-form", "submit", sendChat);
on("#chat-model", "change", chatModelChanged);
on("#chat-compare", "change", chatModelChanged);
on("#chat-stop", "click", () => chatting?.abort());
on("#chat-clear", "click", clearChat);
$("#chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { // Enter sends, Shift+Enter a new line
    event.preventDefault();
    $("#chat-form").requestSubmit();
  }
});
setUpDropZone();
start().catch(failed);
