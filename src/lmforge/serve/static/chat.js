// lmforge chat page: plain JS, no build step, no third-party code. Talks to this server's
// OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions with stream: true (server-sent
// events read from fetch's ReadableStream). Model output is only ever set as textContent, never
// as HTML: a reply that contains markup shows the markup as text.
"use strict";

const KEY_STORAGE = "lmforge.apiKey";
const SETTINGS_STORAGE = "lmforge.settings";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), newChat: $("new-chat"), toggleSettings: $("toggle-settings"), settings: $("settings"),
  temperature: $("temperature"), temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"),
  system: $("system-prompt"), apiKey: $("api-key"), error: $("error"), errorText: $("error-text"),
  errorClose: $("error-close"), messages: $("messages"), empty: $("empty"), composer: $("composer"),
  input: $("message-input"), send: $("send"), stop: $("stop"), status: $("status"),
};

const state = { history: [], controller: null, chat: 0 };   // chat: which conversation (New chat adds 1)

// An error the server answered (HTTP status and its message), as opposed to a network failure.
class ServerError extends Error {}

// ---- settings and the API key (localStorage) ----

function loadSettings() {
  ui.apiKey.value = localStorage.getItem(KEY_STORAGE) || "";
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}");
    if (typeof saved.temperature === "number") ui.temperature.value = String(saved.temperature);
    if (typeof saved.maxTokens === "number") ui.maxTokens.value = String(saved.maxTokens);
    if (typeof saved.system === "string") ui.system.value = saved.system;
  } catch (_) { /* a damaged entry: keep the defaults */ }
  ui.temperatureValue.textContent = ui.temperature.value;
}

function saveSettings() {
  ui.temperatureValue.textContent = ui.temperature.value;
  localStorage.setItem(SETTINGS_STORAGE, JSON.stringify({
    temperature: Number(ui.temperature.value), maxTokens: Number(ui.maxTokens.value), system: ui.system.value,
  }));
}

function saveKey() {
  const key = ui.apiKey.value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// ---- errors ----

function showError(text) {
  ui.errorText.textContent = text;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.errorText.textContent = "";
}

// The OpenAI error shape {"error": {"message": ...}} of a failed response, with its HTTP status.
async function responseError(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) { /* not JSON: keep the status text */ }
  const wait = response.headers.get("Retry-After");
  return `HTTP ${response.status}: ${message}` + (wait ? ` (retry after ${wait} s)` : "");
}

// ---- models ----

loadModels.tries = 0;
async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (err) {
    showError("Network error: cannot reach the server (" + err.message + ")");
    return;
  }
  if (response.status === 503 && loadModels.tries++ < 120) {   // the model is still loading
    ui.status.textContent = "the model is loading…";
    setTimeout(loadModels, 1000);
    return;
  }
  ui.status.textContent = "";
  if (!response.ok) {
    setModels([]);
    showError(await responseError(response) + (response.status === 401 ? " — set the API key in Settings" : ""));
    return;
  }
  const body = await response.json();
  setModels((body.data || []).map((m) => m.id));
  clearError();
}

function setModels(ids) {
  const previous = ui.model.value;
  ui.model.replaceChildren();
  for (const id of ids) {
    const option = document.createElement("option");
    option.value = id;
    option.textContent = id;
    ui.model.append(option);
  }
  if (!ids.length) {
    const option = document.createElement("option");
    option.value = "";
    option.textContent = "no model";
    ui.model.append(option);
  } else if (ids.includes(previous)) {
    ui.model.value = previous;
  }
  document.title = ids.length ? `${ui.model.value} · lmforge chat` : "lmforge chat";
}

// ---- the conversation ----

function addMessage(role, text) {
  ui.empty.hidden = true;
  const item = document.createElement("article");
  item.className = "msg " + role;
  item.dataset.role = role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : (ui.model.value || "model");
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;           // text, never HTML
  const meta = document.createElement("div");
  meta.className = "meta";
  item.append(who, content, meta);
  ui.messages.append(item);
  scrollToEnd();
  return { item, content, meta };
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function setStreaming(on) {
  document.body.dataset.state = on ? "streaming" : "idle";
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  ui.send.disabled = on;
}

function newChat() {
  state.chat += 1;                  // a reply still streaming belongs to the old conversation: dropped
  if (state.controller) state.controller.abort();
  state.history = [];
  for (const node of [...ui.messages.querySelectorAll(".msg")]) node.remove();
  ui.empty.hidden = false;
  ui.status.textContent = "";
  clearError();
  ui.input.focus();
}

function requestBody() {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { messages, stream: true, stream_options: { include_usage: true },
                 temperature: Number(ui.temperature.value) };
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
  if (ui.model.value) body.model = ui.model.value;
  return body;
}

// Server-sent events: "data: {json}" lines separated by blank lines, "data: [DONE]" at the end.
// Calls onEvent(parsed JSON) for each; returns when the stream ends.
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (!line.startsWith("data:")) continue;       // blank separators, comments, event names
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      if (data) onEvent(JSON.parse(data));
    }
    if (done) return;
  }
}

async function send(text) {
  const chat = state.chat;
  clearError();
  state.history.push({ role: "user", content: text });
  const asked = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.item.classList.add("streaming");
  reply.item.setAttribute("aria-busy", "true");   // screen readers read the reply once it is complete
  reply.content.dataset.deltas = "0";
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  ui.status.textContent = "generating…";
  const started = performance.now();
  let replyText = "", deltas = 0, finish = null, usage = null, failed = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) throw new ServerError(await responseError(response));
    await readEvents(response.body, (event) => {
      if (event.error) throw new ServerError("error: " + (event.error.message || JSON.stringify(event.error)));
      if (event.usage) usage = event.usage;
      const choice = (event.choices || [])[0];
      if (!choice) return;
      const piece = (choice.delta && choice.delta.content) || "";
      if (piece) {
        replyText += piece;
        deltas += 1;
        reply.content.textContent = replyText;  // text, never HTML
        reply.content.dataset.deltas = String(deltas);
        scrollToEnd();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
  } catch (err) {
    if (err.name === "AbortError") {
      finish = "stopped";
    } else {
      controller.abort();             // let go of the connection: the server frees the slot
      if (err instanceof ServerError) failed = err.message;
      else if (err instanceof SyntaxError) failed = "Bad response from the server: " + err.message;
      else failed = "Network error: " + err.message;
    }
  } finally {
    state.controller = null;
    setStreaming(false);
  }
  if (chat !== state.chat) return;   // New chat was pressed meanwhile
  if (!replyText && (failed || finish === "stopped")) {
    withdraw(asked, reply, text, failed);
    return;
  }
  finishReply(reply, replyText, { finish, usage, failed, seconds: (performance.now() - started) / 1000 });
}

// A turn that failed or was stopped before any reply: it leaves the conversation, its text goes back to
// the input box.
function withdraw(asked, reply, text, failed) {
  asked.item.remove();
  reply.item.remove();
  state.history.pop();
  if (!ui.input.value) {
    ui.input.value = text;
    autosize();
  }
  ui.empty.hidden = state.history.length > 0;
  ui.status.textContent = "";
  if (failed) showError(failed);
}

function finishReply(reply, text, { finish, usage, failed, seconds }) {
  reply.item.classList.remove("streaming");
  reply.item.removeAttribute("aria-busy");
  reply.item.dataset.finish = failed ? "error" : (finish || "");
  state.history.push({ role: "assistant", content: text });
  const notes = [];
  if (usage && usage.completion_tokens) {
    notes.push(`${usage.completion_tokens} tokens`);
    if (seconds > 0) notes.push(`${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`);
  }
  if (finish === "length") notes.push("stopped at max tokens");
  if (finish === "stopped") notes.push("stopped by you");
  reply.meta.textContent = notes.join(" · ");
  if (failed) showError(failed);
  ui.status.textContent = finish === "stopped" ? "stopped" : "";
}

// ---- wiring ----

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = Math.min(ui.input.scrollHeight, 200) + "px";
}

function submit(event) {
  if (event) event.preventDefault();
  const text = ui.input.value;
  if (!text.trim() || state.controller) return;
  ui.input.value = "";
  autosize();
  send(text);
}

function init() {
  loadSettings();
  ui.composer.addEventListener("submit", submit);
  ui.settings.addEventListener("submit", (e) => e.preventDefault());
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) submit(e);   // isComposing: IME input (Chinese)
  });
  ui.input.addEventListener("input", autosize);
  ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) state.controller.abort();   // Esc stops, as the button does
  });
  ui.newChat.addEventListener("click", newChat);
  ui.errorClose.addEventListener("click", clearError);
  ui.temperature.addEventListener("input", saveSettings);
  ui.maxTokens.addEventListener("change", saveSettings);
  ui.system.addEventListener("change", saveSettings);
  ui.apiKey.addEventListener("change", () => { saveKey(); loadModels(); });
  ui.model.addEventListener("change", () => { document.title = `${ui.model.value} · lmforge chat`; });
  ui.toggleSettings.addEventListener("click", () => {
    const open = ui.settings.classList.toggle("open");
    ui.toggleSettings.setAttribute("aria-expanded", String(open));
  });
  loadModels();
  ui.input.focus();
}

init();
