// The page to try a model: lists models, sends images to /predict and /explain, shows
// the answers. Everything that comes from the server is written with textContent (never
// as HTML), and nothing is fetched from anywhere but this origin.
"use strict";

const KEY_STORE = "resnet-serve.api-key";
const REPORT_TITLES = {
  "curves.png": "Loss and validation metric per epoch",
  "confusion_matrix.png": "Confusion matrix (validation)",
  "pr_curves.png": "Precision-recall per class (validation)",
  "calibration.png": "Calibration before and after temperature scaling",
};

const state = { models: [], model: null, previewUrls: [], reportUrls: [] };
const byId = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, detail, retryAfter) {
    super(detail);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

// fetch with the API key; resolves {response, ms} for a 2xx, else throws ApiError(detail)
async function api(path, options = {}) {
  const started = performance.now();
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (err) {
    throw new ApiError(0, "the service cannot be reached (" + err.message + ")", null);
  }
  const ms = performance.now() - started;
  if (!response.ok) {
    let detail = response.statusText || "request failed";
    try {
      const body = await response.json();
      if (body && typeof body.detail === "string") detail = body.detail;
    } catch (_) {
      // not JSON: keep the status text
    }
    if (response.status === 401) askForKey(detail);
    throw new ApiError(response.status, detail, response.headers.get("Retry-After"));
  }
  return { response, ms };
}

function describe(err) {
  if (!(err instanceof ApiError)) return String((err && err.message) || err);
  let text = err.status ? err.status + ": " + err.message : err.message;
  if (err.status === 429 && err.retryAfter) text += " (retry after " + err.retryAfter + " s)";
  if (err.status === 401) text += " (enter an API key above)";
  return text;
}

function showStatus(text) {
  const status = byId("status");
  status.textContent = text;
  status.hidden = !text;
}

function askForKey(reason) {
  byId("key-section").hidden = false;
  byId("key-why").textContent = reason || "This service needs an API key.";
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function keepUrl(list, url) {
  list.push(url);
  return url;
}

function revokeAll(list) {
  for (const url of list.splice(0)) URL.revokeObjectURL(url);
}

function percent(score) {
  return (100 * score).toFixed(1) + "%";
}

// ---- models and their cards ------------------------------------------------------------

async function loadModels() {
  showStatus("");
  let body;
  try {
    const { response } = await api("/models");
    body = await response.json();
  } catch (err) {
    showStatus("Cannot list the models: " + describe(err));
    return;
  }
  state.models = body.models.filter((m) => m.status === "loaded" && m.card);
  const select = byId("model-select");
  select.replaceChildren();
  for (const info of state.models) {
    select.append(new Option(info.name + " (" + info.card.task.replace("_", "-") + ")", info.name));
  }
  const failed = body.models.filter((m) => m.status === "failed");
  if (failed.length) {
    showStatus("Not loaded: " + failed.map((m) => m.name + ": " + (m.error || "failed")).join("; "));
  }
  if (!state.models.length) {
    showStatus("No model is loaded yet; reload this page in a moment.");
    return;
  }
  const chosen = state.models.find((m) => m.name === body.default) || state.models[0];
  select.value = chosen.name;
  selectModel(chosen.name);
}

function selectModel(name) {
  const info = state.models.find((m) => m.name === name);
  if (!info) return;
  state.model = info;
  const card = info.card;
  const single = card.task === "single_label";
  byId("topk-input").hidden = byId("topk-label").hidden = !single;
  byId("topk-input").max = String(card.classes.length);
  byId("model-summary").textContent = card.arch + ", " + card.task.replace("_", "-") + ", " +
    card.classes.length + " classes, " + card.preprocessing.crop + " px crop" +
    (single ? "; shows the top classes" : "; shows every class against its threshold");
  revokeAll(state.reportUrls);
  renderCard(info);
  loadReports(info.name);
}

function addRow(list, term, value) {
  list.append(element("dt", "", term));
  const dd = element("dd");
  if (value instanceof Node) dd.append(value);
  else dd.textContent = value;
  list.append(dd);
}

function plain(value) {
  if (value === null || value === undefined) return "none";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function renderCard(info) {
  const card = info.card;
  const body = byId("card-body");
  body.replaceChildren();
  const facts = element("dl", "card-grid");
  addRow(facts, "Name", card.name);
  addRow(facts, "Architecture", card.arch);
  addRow(facts, "Task", card.task);
  addRow(facts, "Loaded", info.loaded_at || "");
  if (card.created_at) addRow(facts, "Trained", card.created_at);
  const classes = element("ul", "classes");
  card.classes.forEach((label, i) => {
    const cut = card.thresholds ? " (threshold " + card.thresholds[i].toFixed(2) + ")" : "";
    classes.append(element("li", "", label + cut));
  });
  addRow(facts, "Classes", classes);
  const pre = card.preprocessing;
  addRow(facts, "Preprocessing", "resize " + pre.resize + ", crop " + pre.crop + ", " + pre.interpolation);
  body.append(facts);
  body.append(element("h3", "", "Validation metrics"));
  body.append(keyValues(card.metrics || {}));
  body.append(element("h3", "", "Training summary"));
  body.append(keyValues(card.training || {}));
  body.append(element("h3", "", "Report figures"));
  body.append(element("div", "reports"));
}

function keyValues(values) {
  const list = element("dl", "card-grid");
  const keys = Object.keys(values);
  if (!keys.length) return element("p", "hint", "none recorded");
  for (const key of keys) addRow(list, key, plain(values[key]));
  return list;
}

async function loadReports(name) {
  const holder = byId("card-body").querySelector(".reports");
  try {
    const { response } = await api("/models/" + encodeURIComponent(name) + "/reports");
    const { reports } = await response.json();
    if (!reports.length) holder.append(element("p", "hint", "No report figures in this checkpoint."));
    for (const file of reports) {
      const shown = await api("/models/" + encodeURIComponent(name) + "/reports/" + encodeURIComponent(file));
      const figure = element("figure");
      const img = element("img");
      img.src = keepUrl(state.reportUrls, URL.createObjectURL(await shown.response.blob()));
      img.alt = (REPORT_TITLES[file] || file) + " for model " + name;
      figure.append(img, element("figcaption", "", REPORT_TITLES[file] || file));
      holder.append(figure);
    }
  } catch (err) {
    holder.append(element("p", "error", "Cannot load the report figures: " + describe(err)));
  }
}

// ---- images ----------------------------------------------------------------------------

function handleFiles(files) {
  if (!state.model) {
    showStatus("Choose a model first (none is loaded, or the list could not be read).");
    return;
  }
  for (const file of files) addResult(file, state.model);
}

function addResult(file, model) {
  const item = byId("result-template").content.firstElementChild.cloneNode(true);
  const preview = item.querySelector(".preview");
  const previewUrl = keepUrl(state.previewUrls, URL.createObjectURL(file));
  preview.src = previewUrl;
  preview.alt = "Uploaded image " + file.name;
  item.querySelector(".filename").textContent = file.name;
  item.dataset.state = "waiting";
  item.querySelector(".meta").textContent = "Classifying with " + model.name + "...";
  byId("results").prepend(item);
  classify(item, file, model, previewUrl);
}

function formWith(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return form;
}

async function classify(item, file, model, previewUrl) {
  const single = model.card.task === "single_label";
  const params = new URLSearchParams({ model: model.name });
  if (single) params.set("top_k", byId("topk-input").value || "5");
  else params.set("all_scores", "true");
  try {
    const { response, ms } = await api("/predict?" + params, { method: "POST", body: formWith(file) });
    const result = (await response.json()).results[0];
    const top = showResult(item, model, result, ms);
    wireHeatmap(item, file, model, previewUrl, top);
    item.dataset.state = "done";
  } catch (err) {
    showError(item, err);
  }
}

function showError(item, err) {
  const error = item.querySelector(".error");
  error.textContent = describe(err);
  error.hidden = false;
  item.querySelector(".meta").textContent = "";
  item.dataset.state = "error";
}

// draws the bars; returns the label to explain (the best-scoring one)
function showResult(item, model, result, ms) {
  const card = model.card;
  item.querySelector(".meta").textContent = model.name + " answered in " + Math.round(ms) + " ms";
  if (result.unknown === true) {
    const unknown = item.querySelector(".unknown");
    unknown.textContent = "Unknown: this image looks unlike the training data (score " +
      result.unknown_score.toFixed(3) + ")";
    unknown.hidden = false;
    item.classList.add("is-unknown");
  }
  const bars = item.querySelector(".bars");
  bars.replaceChildren();
  if (card.task === "single_label") {
    result.predictions.forEach((p, i) => bars.append(bar(p.label, p.score, null, i === 0)));
    return result.predictions.length ? result.predictions[0].label : null;
  }
  const passing = new Set(result.predictions.map((p) => p.label));
  const rows = card.classes.map((label, i) => ({
    label, score: result.scores[label], cut: card.thresholds ? card.thresholds[i] : 0.5,
  }));
  rows.sort((a, b) => b.score - a.score);
  for (const row of rows) bars.append(bar(row.label, row.score, row.cut, passing.has(row.label)));
  if (!passing.size) bars.append(element("li", "hint", "No class passes its threshold."));
  return rows.length ? rows[0].label : null;
}

function bar(label, score, cut, passes) {
  const row = element("li", passes ? "bar pass" : "bar");
  const track = element("div", "track");
  track.setAttribute("aria-hidden", "true");
  const fill = element("div", "fill");
  fill.style.width = Math.max(0, Math.min(100, 100 * score)) + "%";
  track.append(fill);
  let scoreText = percent(score);
  if (cut !== null) {
    const mark = element("span", "cut");
    mark.style.left = 100 * cut + "%";
    mark.title = "threshold " + cut.toFixed(2);
    track.append(mark);
    scoreText += passes ? " (passes)" : "";
    row.title = "threshold " + cut.toFixed(2);
  }
  row.append(element("span", "label", label), track, element("span", "score", scoreText));
  return row;
}

function wireHeatmap(item, file, model, previewUrl, label) {
  const toggle = item.querySelector(".heat-toggle");
  const preview = item.querySelector(".preview");
  const note = item.querySelector(".heat-note");
  if (label === null) return;
  let heatmap = null;
  toggle.disabled = false;
  toggle.addEventListener("click", async () => {
    if (toggle.getAttribute("aria-pressed") === "true") {
      preview.src = previewUrl;
      preview.alt = "Uploaded image " + file.name;
      toggle.setAttribute("aria-pressed", "false");
      note.hidden = true;
      return;
    }
    toggle.disabled = true;
    try {
      if (heatmap === null) heatmap = await explain(file, model, label);
      preview.src = "data:image/png;base64," + heatmap.heatmap;
      preview.alt = "Where " + model.name + " looked for " + heatmap.class + " in " + file.name;
      note.textContent = "Class activation map for " + heatmap.class + " (" + percent(heatmap.score) +
        ") over the " + model.card.preprocessing.crop + " px crop the model saw.";
      note.hidden = false;
      toggle.setAttribute("aria-pressed", "true");
      item.dataset.heatmap = "shown";
    } catch (err) {
      showError(item, err);
    } finally {
      toggle.disabled = false;
    }
  });
}

async function explain(file, model, label) {
  const params = new URLSearchParams({ model: model.name, class: label });
  const { response } = await api("/explain?" + params, { method: "POST", body: formWith(file) });
  return (await response.json()).results[0];
}

// ---- wiring ----------------------------------------------------------------------------

function setUp() {
  const drop = byId("drop");
  const input = byId("file-input");
  drop.addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    handleFiles(Array.from(input.files));
    input.value = "";
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    handleFiles(Array.from(event.dataTransfer.files));
  });
  // a file dropped beside the zone must not replace the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
    if (files.length) handleFiles(files);
  });
  byId("model-select").addEventListener("change", (event) => selectModel(event.target.value));
  byId("clear").addEventListener("click", () => {
    byId("results").replaceChildren();
    revokeAll(state.previewUrls);
  });
  byId("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, byId("key-input").value.trim());
    byId("key-input").value = "";
    byId("key-why").textContent = "Key kept for this tab.";
    loadModels();
  });
  byId("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    byId("key-why").textContent = "Key forgotten.";
  });
  if (sessionStorage.getItem(KEY_STORE)) byId("key-section").hidden = false;
  loadModels();
}

document.addEventListener("DOMContentLoaded", setUp);
