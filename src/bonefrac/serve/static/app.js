// The page's behaviour: send the chosen files one by one to /v1/predict, show each answer in the order the files
// were dropped with a summary table and its CSV, and the model card.
// Plain JavaScript with no library and no build step; everything comes from this server, so it works offline.
// File names and server text are put into the page with textContent only, never as HTML.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const ZOOM_STEP = 1.5;
const MAX_ZOOM = 16;

// One entry per dropped file, in drop order: the file (asked again when the operating point changes or a heatmap
// is wanted), the server's answer or error, whether its heatmap was asked for, and how its image is viewed.
let entries = [];
let queue = Promise.resolve(); // one request at a time: the server runs one model call at a time anyway
let pending = 0;
let modelCard = null;

// --- the token, when the server asks for one (bonefrac serve --token-file) -----------------------------------------
// Asked once, when the API first answers 401, and kept in sessionStorage: this tab only, gone when it is closed.

const TOKEN_KEY = "bonefrac-token";
let token = sessionStorage.getItem(TOKEN_KEY);
let asking = null; // the open token dialog, shared by every request that got a 401 meanwhile

function askToken(reason) {
  if (!asking) {
    asking = new Promise((resolve) => {
      const dialog = $("#token-dialog");
      $("#token-reason").textContent = `The server said: ${reason}.`;
      $("#token-input").value = "";
      dialog.returnValue = "";
      dialog.addEventListener("close", () => {
        asking = null;
        resolve(dialog.returnValue === "cancel" ? null : $("#token-input").value.trim() || null);
      }, { once: true });
      dialog.showModal();
    });
  }
  return asking;
}

// fetch with the token; on a 401, ask for the token and try again (until the user cancels).
async function api(url, options = {}) {
  for (;;) {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(url, { ...options, headers });
    if (response.status !== 401) return response;
    const detail = (await response.clone().json().catch(() => ({}))).detail || "a token is needed";
    const given = await askToken(detail);
    if (!given) return response;
    token = given;
    sessionStorage.setItem(TOKEN_KEY, token);
  }
}

function setStatus(text) {
  $("#status").textContent = text;
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function analyse(files) {
  const heatmap = $("#want-heatmap").checked;
  for (const file of files) {
    const entry = { file, answer: null, error: null, heatmap, view: freshView(), node: null, row: null };
    entries.push(entry);
    entry.node = newResult(entry);
    entry.row = newSummaryRow(entry);
    ask(entry);
  }
}

function freshView() {
  return { scale: 1, x: 0, y: 0, window: 256, level: 128, opacity: 70 };
}

// Queue a request for the entry at the operating point selected now; the answer replaces what the entry showed.
function ask(entry) {
  pending += 1;
  $("#operating-point").disabled = true; // one operating point per round of answers
  $(".pending", entry.node).hidden = false;
  $(".pending", entry.node).textContent = "Waiting…";
  queue = queue.then(() => request(entry)).then(() => {
    pending -= 1;
    if (pending === 0) {
      $("#operating-point").disabled = false;
      setStatus(`Done: ${plural(entries.length, "file")} analysed.`);
    }
  });
}

async function request(entry) {
  if (!entries.includes(entry)) return; // cleared meanwhile
  const position = entries.indexOf(entry) + 1;
  const what = entry.heatmap ? " with its Grad-CAM heatmap" : "";
  setStatus(`Analysing ${entry.file.name}${what} (${position} of ${entries.length})…`);
  $(".pending", entry.node).textContent = `Analysing${what}…`;
  const body = new FormData();
  body.append("file", entry.file, entry.file.name);
  const point = $("#operating-point").value;
  if (point) body.append("operating_point", point);
  try {
    const response = await api(`/v1/predict?heatmap=${entry.heatmap}&image=true`, { method: "POST", body });
    const answer = await response.json();
    if (response.ok) {
      entry.answer = answer;
      entry.error = null;
    } else {
      entry.answer = null;
      entry.error = { status: response.status, detail: answer.detail || response.statusText };
    }
  } catch (error) {
    entry.answer = null;
    entry.error = { status: 0, detail: `the server could not be reached (${error.message})` };
  }
  if (!entries.includes(entry)) return;
  if (entry.answer) showResult(entry);
  else showError(entry);
  fillSummaryRow(entry);
}

// --- one result ----------------------------------------------------------------------------------------------------

function newResult(entry) {
  $("#no-results").hidden = true;
  $("#batch").hidden = false;
  const node = $("#result-template").content.firstElementChild.cloneNode(true);
  node.id = `result-${entries.length}`;
  $(".file", node).textContent = entry.file.name;
  $("#results").append(node); // drop order: the first file dropped stays on top
  return node;
}

function showError(entry) {
  const node = entry.node;
  $(".pending", node).hidden = true;
  $(".layout", node).hidden = true;
  let message = $(".error", node);
  if (!message) {
    message = document.createElement("p");
    message.className = "error";
    message.setAttribute("role", "alert");
    node.append(message);
  }
  const { status, detail } = entry.error;
  message.textContent = `Not analysed${status ? ` (HTTP ${status})` : ""}: ${detail}`;
}

function showResult(entry) {
  const answer = entry.answer;
  // A fresh copy of the template each time: nothing of the previous answer (heatmap, level) lingers.
  const node = $("#result-template").content.firstElementChild.cloneNode(true);
  node.id = entry.node.id;
  entry.node.replaceWith(node);
  entry.node = node;
  const id = node.id;
  $(".file", node).textContent = answer.file;
  $(".pending", node).hidden = true;
  $(".layout", node).hidden = false;

  showImage(entry, node, id);
  showHeatmap(entry, node, id);
  showBoxes(entry, node);

  if (!answer.accepted) {
    const ood = $(".ood", node);
    ood.hidden = false;
    ood.textContent = `Warning: this does not look like a bone radiograph (${answer.ood_reason}). ` +
      "The probabilities below mean little for it.";
    node.classList.add("rejected");
  }

  $(".decision", node).textContent = `Decision: ${answer.decision}`;
  const level = $(".level", node);
  if (answer.level_words) {
    level.textContent = `Three-level answer: ${answer.level_words}`;
    level.classList.add(`level-${answer.level.replace(" ", "-")}`);
  } else {
    level.remove();
  }
  const bar = $(".bar", node);
  const legend = $(".bar-legend", node);
  if (answer.probability !== null) {
    $(".fill", bar).style.width = percent(answer.probability);
    $(".marker", bar).style.left = percent(answer.threshold);
    const words = `probability of ${answer.positive_label} ${percent(answer.probability)}, ` +
      `threshold ${percent(answer.threshold)}`;
    bar.setAttribute("aria-label", words);
    legend.textContent = `Bar: ${words} (the black line).`;
  } else {
    bar.remove();
    legend.remove();
  }
  $(".meaning", node).textContent = `Threshold (${answer.operating_point}): ${answer.threshold_meaning}.`;
  const list = $(".probabilities", node);
  for (const [label, p] of Object.entries(answer.probabilities)) {
    const item = document.createElement("li");
    item.textContent = `${label}: ${p.toFixed(4)}`;
    list.append(item);
  }
}

// The X-ray on a canvas, so that window/level maps its gray values exactly; zoom and pan move the canvas and the
// heatmap layer together.
function showImage(entry, node, id) {
  const answer = entry.answer;
  const canvas = $("canvas.xray", node);
  entry.gray = null; // until this answer's image is decoded
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label",
    `the uploaded image ${answer.file} (${answer.image.width}×${answer.image.height}, ${answer.image.format})`);
  const source = new Image();
  source.onload = () => {
    canvas.width = source.naturalWidth;
    canvas.height = source.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(source, 0, 0);
    entry.gray = context.getImageData(0, 0, canvas.width, canvas.height); // the gray values as the server sent them
    applyWindow(entry);
    canvas.dataset.ready = "true";
  };
  source.src = `data:image/png;base64,${answer.image_png}`;

  const view = entry.view;
  const viewport = $(".viewport", node);
  const windowSlider = $("input.wl-window", node);
  const levelSlider = $("input.wl-level", node);
  for (const [slider, name] of [[windowSlider, "window"], [levelSlider, "level"]]) {
    slider.id = `${id}-${name}`;
    $(`.wl-${name}-label`, node).htmlFor = slider.id;
    slider.value = view[name];
    slider.addEventListener("input", () => {
      view[name] = Number(slider.value);
      applyWindow(entry);
    });
  }
  const zoomAt = (factor, cx, cy) => {
    const scale = Math.min(MAX_ZOOM, Math.max(1, view.scale * factor));
    // Keep the point under (cx, cy) where it is.
    view.x = cx - (cx - view.x) * (scale / view.scale);
    view.y = cy - (cy - view.y) * (scale / view.scale);
    view.scale = scale;
    applyView(entry);
  };
  const centre = () => [viewport.clientWidth / 2, viewport.clientHeight / 2];
  $(".zoom-in", node).addEventListener("click", () => zoomAt(ZOOM_STEP, ...centre()));
  $(".zoom-out", node).addEventListener("click", () => zoomAt(1 / ZOOM_STEP, ...centre()));
  const reset = () => {
    Object.assign(view, freshView(), { opacity: view.opacity });
    windowSlider.value = view.window;
    levelSlider.value = view.level;
    applyView(entry);
    applyWindow(entry);
  };
  $(".reset-view", node).addEventListener("click", reset);
  viewport.addEventListener("dblclick", reset);
  viewport.addEventListener("wheel", (event) => {
    event.preventDefault();
    const box = viewport.getBoundingClientRect();
    zoomAt(event.deltaY < 0 ? 1.2 : 1 / 1.2, event.clientX - box.left, event.clientY - box.top);
  }, { passive: false });
  // Drag pans; shift-drag sets window (left-right) and level (up-down), as in a PACS viewer.
  let drag = null;
  viewport.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX, y: event.clientY, view: { ...view }, shift: event.shiftKey };
    viewport.setPointerCapture(event.pointerId);
  });
  viewport.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const dx = event.clientX - drag.x;
    const dy = event.clientY - drag.y;
    if (drag.shift) {
      view.window = Math.min(256, Math.max(1, Math.round(drag.view.window + dx)));
      view.level = Math.min(255, Math.max(0, Math.round(drag.view.level - dy)));
      windowSlider.value = view.window;
      levelSlider.value = view.level;
      applyWindow(entry);
    } else {
      view.x = drag.view.x + dx;
      view.y = drag.view.y + dy;
      applyView(entry);
    }
  });
  for (const name of ["pointerup", "pointercancel"]) viewport.addEventListener(name, () => { drag = null; });
  applyView(entry);
}

// Zoom and pan, kept so that the image always fills the viewport (no panning off into the black).
function applyView(entry) {
  const view = entry.view;
  const viewport = $(".viewport", entry.node);
  const width = viewport.clientWidth;
  const height = viewport.clientHeight;
  view.x = Math.min(0, Math.max(width - width * view.scale, view.x));
  view.y = Math.min(0, Math.max(height - height * view.scale, view.y));
  $(".stage", entry.node).style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
  $(".viewport", entry.node).classList.toggle("zoomed", view.scale > 1);
}

// Window/level: gray values from level - window/2 to level + window/2 are spread over black to white.
function applyWindow(entry) {
  if (!entry.gray) return;
  const { window: width, level } = entry.view;
  const low = level - width / 2;
  const table = new Uint8ClampedArray(256);
  for (let v = 0; v < 256; v += 1) table[v] = Math.round(((v - low) * 256) / width);
  const source = entry.gray.data;
  const shown = new ImageData(entry.gray.width, entry.gray.height);
  for (let i = 0; i < source.length; i += 4) {
    const v = table[source[i]];
    shown.data[i] = v;
    shown.data[i + 1] = v;
    shown.data[i + 2] = v;
    shown.data[i + 3] = 255;
  }
  $("canvas.xray", entry.node).getContext("2d").putImageData(shown, 0, 0);
  for (const name of ["window", "level"]) {
    $(`input.wl-${name}`, entry.node).setAttribute("aria-valuetext", String(entry.view[name]));
  }
}

function showHeatmap(entry, node, id) {
  const answer = entry.answer;
  const heat = $("img.heat", node);
  const button = $(".heat-button", node);
  const caption = $(".heat-caption", node);
  if (!answer.heatmap) {
    heat.remove();
    caption.textContent = "Grad-CAM heatmap: not computed (it takes a backward pass through the model).";
    button.addEventListener("click", () => {
      entry.heatmap = true;
      button.disabled = true;
      button.textContent = "Computing the heatmap…";
      ask(entry);
    });
    return;
  }
  button.remove();
  heat.hidden = false;
  heat.src = `data:image/png;base64,${answer.heatmap.heatmap_png}`;
  heat.alt = `Grad-CAM heatmap for class ${answer.heatmap.target}, laid over the image`;
  const control = $(".opacity-control", node);
  control.hidden = false;
  const slider = $(".opacity", node);
  slider.id = `${id}-opacity`;
  $(".opacity-label", node).htmlFor = slider.id;
  slider.value = entry.view.opacity;
  const setOpacity = () => {
    entry.view.opacity = Number(slider.value);
    heat.style.opacity = slider.value / 100;
    slider.setAttribute("aria-valuetext", `${slider.value} %`);
  };
  slider.addEventListener("input", setOpacity);
  setOpacity();
  caption.textContent = answer.heatmap.flat
    ? "Grad-CAM: the map is flat, it points nowhere in particular."
    : `Grad-CAM for “${answer.heatmap.target}”: coloured where the image moved that score most (red most), ` +
      "clear where it did not. Where the model looked, not proof of a fracture.";
}

// A localiser's boxes (the API gives them in the file's pixels, best first, each with its level): those at the run's
// "fracture" or "doubt" box threshold (chosen on validation), styled by level; for a run without box thresholds (every
// level null) its best three, as `bonefrac explain` draws them. A classifier's answer has no boxes, and the controls go.
const BEST_SHOWN = 3;

function boxesShown(boxes) {
  const levelled = boxes.some((box) => box.level !== null);
  return levelled ? boxes.filter((box) => box.level === "fracture" || box.level === "doubt")
    : boxes.slice(0, BEST_SHOWN);
}

function showBoxes(entry, node) {
  const answer = entry.answer;
  const layer = $("svg.boxes", node);
  const control = $(".boxes-control", node);
  const caption = $(".boxes-caption", node);
  if (!answer.boxes) {
    layer.remove();
    control.remove();
    caption.remove();
    return;
  }
  const SVG = layer.namespaceURI; // new rectangles and labels in the layer's own (SVG) namespace
  layer.setAttribute("viewBox", `0 0 ${answer.image.width} ${answer.image.height}`);
  const drawn = boxesShown(answer.boxes);
  const fontSize = Math.max(12, answer.image.height / 40);
  const named = (box) => `${box.level ?? "box"} ${box.score.toFixed(2)}`;
  for (const box of drawn) {
    for (const kind of ["halo", "box"]) {
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("class", kind === "box" && box.level ? `box ${box.level}` : kind);
      rect.setAttribute("x", box.x0);
      rect.setAttribute("y", box.y0);
      rect.setAttribute("width", box.x1 - box.x0);
      rect.setAttribute("height", box.y1 - box.y0);
      layer.append(rect);
    }
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", box.x0);
    label.setAttribute("y", Math.max(fontSize, box.y0 - 4));
    label.setAttribute("font-size", fontSize);
    if (box.level) label.setAttribute("class", box.level);
    label.textContent = named(box);
    layer.append(label);
  }
  layer.setAttribute("role", "img");
  layer.setAttribute("aria-label", drawn.length
    ? `${drawn.length} boxes from the localiser: ${drawn.map(named).join(", ")}`
    : "the localiser drew no box");
  const toggle = $(".show-boxes", node);
  const apply = () => { layer.style.display = toggle.checked ? "" : "none"; }; // an SVG element has no .hidden
  toggle.addEventListener("change", apply);
  control.hidden = false;
  apply();
  caption.hidden = false;
  const levelled = answer.boxes.some((box) => box.level !== null);
  const what = levelled
    ? "red: fracture, orange: doubt (score thresholds chosen on validation, see the model card)"
    : `the localiser's ${BEST_SHOWN} best (this run has no box thresholds)`;
  caption.textContent = drawn.length
    ? `Boxes: ${what}, each with its score (the heat probability at its centre). ` +
      "Where its evidence is, not a finding."
    : `Boxes: none ${levelled ? "reaches the doubt threshold" : "found"}.`;
}

// --- the summary table and its CSV ---------------------------------------------------------------------------------

function newSummaryRow(entry) {
  const row = document.createElement("tr");
  $("#summary tbody").append(row);
  fillSummaryRow(entry, row);
  return row;
}

function fillSummaryRow(entry, row = entry.row) {
  row.replaceChildren();
  const number = entries.indexOf(entry) + 1;
  cell(row, String(number));
  const nameCell = document.createElement("td");
  const link = document.createElement("a");
  link.href = `#${entry.node.id}`;
  link.textContent = entry.file.name;
  nameCell.append(link);
  row.append(nameCell);
  const answer = entry.answer;
  if (answer) {
    cell(row, answer.accepted ? answer.prediction : `not assessed (${answer.prediction} if it were)`);
    const p = answer.probability !== null ? answer.probability : answer.probabilities[answer.prediction];
    cell(row, p.toFixed(3));
    cell(row, answer.level || "n/a");
    cell(row, answer.accepted ? "looks like a radiograph" : `not a radiograph: ${answer.ood_reason}`);
    row.className = answer.accepted ? "" : "rejected";
  } else if (entry.error) {
    cell(row, `error (HTTP ${entry.error.status}): ${entry.error.detail}`);
    for (let i = 0; i < 3; i += 1) cell(row, "");
    row.className = "rejected";
  } else {
    cell(row, "waiting…");
    for (let i = 0; i < 3; i += 1) cell(row, "");
  }
}

// One CSV field as Python's csv module writes it (bonefrac predict): quoted only when it must be, booleans as
// True/False, nothing for null; text a spreadsheet would run as a formula gets a leading quote, by the rule of
// bonefrac.safe_text.neutralise_csv (a file name may start with "=").
function csvField(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "boolean") return value ? "True" : "False";
  let text = String(value);
  const number = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(text);
  if (typeof value === "string" && (text.startsWith("'") || (/^[=+\-@\t\r]/.test(text) && !number))) {
    text = `'${text}`;
  }
  return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

// The rows with the columns of `bonefrac predict --out FILE.csv` (the model card's csv_columns), in drop order.
function predictionsCsv() {
  const columns = modelCard.csv_columns;
  const lines = [columns.join(",")];
  for (const entry of entries) {
    const answer = entry.answer;
    const record = answer
      ? { ...answer, truncated: answer.image.truncated }
      : { file: entry.file.name, status: "error", error: entry.error ? entry.error.detail : "not analysed yet" };
    const values = columns.map((column) => {
      if (column.startsWith("p_") && answer && column.slice(2) in answer.probabilities) {
        return answer.probabilities[column.slice(2)];
      }
      if (column === "boxes" && answer && answer.boxes) { // one cell, as predict writes it: a JSON list per box
        return JSON.stringify(answer.boxes.map((box) => modelCard.box_fields.map((field) => box[field])));
      }
      return record[column];
    });
    lines.push(values.map(csvField).join(","));
  }
  return `${lines.join("\n")}\n`;
}

function downloadCsv() {
  if (!modelCard) {
    setStatus("The CSV needs the model card (its columns), which has not loaded.");
    return;
  }
  const blob = new Blob([predictionsCsv()], { type: "text/csv" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "bonefrac_predictions.csv";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

function cell(row, text, header = false) {
  const element = document.createElement(header ? "th" : "td");
  if (header) element.scope = row.parentElement && row.parentElement.tagName === "THEAD" ? "col" : "row";
  element.textContent = text;
  row.append(element);
}

function fixed(value) {
  return value === null || value === undefined ? "n/a" : value.toFixed(3);
}

async function showCard() {
  const box = $("#card");
  let card;
  try {
    const response = await api("/v1/model");
    card = await response.json();
    if (!response.ok) throw new Error(card.detail || response.statusText);
  } catch (error) {
    box.textContent = `The model card could not be loaded (${error.message}).`;
    return;
  }
  box.replaceChildren();
  modelCard = card;
  if (card.positive_label) $("#probability-header").textContent = `p(${card.positive_label})`;
  const add = (tag, text, className) => {
    const element = document.createElement(tag);
    element.textContent = text;
    if (className) element.className = className;
    box.append(element);
    return element;
  };
  if (card.data.synthetic) add("p", "SYNTHETIC data: this model was trained on phantom images; " +
    "it says nothing about real radiographs.", "warning");
  if (card.data.leaky) add("p", "LEAKY: this run's splits share duplicate images; its numbers overstate.", "warning");
  const facts = add("ul", "");
  const fact = (text) => {
    const item = document.createElement("li");
    item.textContent = text;
    facts.append(item);
  };
  fact(`run ${card.name}: ${card.model} at ${card.image_size} px, ${card.backend} backend`);
  fact(`classes: ${card.labels.join(", ")}` + (card.positive_label ? ` (positive: ${card.positive_label})` : ""));
  if (card.threshold !== null) {
    fact(`threshold ${card.threshold.toFixed(4)} (${card.operating_point}): ${card.threshold_meaning}`);
  } else {
    fact(card.threshold_meaning);
  }
  if (card.levels_meaning) fact(`three-level answer: ${card.levels_meaning}`);
  if (card.box_levels_meaning) fact(`boxes: ${card.box_levels_meaning}`);
  fact(card.calibrated ? `calibrated: temperature ${card.temperature.toFixed(3)}, fitted on validation`
    : "not calibrated: raw softmax probabilities");
  const counts = Object.entries(card.data.counts)
    .map(([split, c]) => `${split || "all"}: ${Object.entries(c).map(([k, v]) => `${k} ${v}`).join(", ")}`);
  fact(`data: ${counts.join("; ") || "unknown"}`);
  add("p", `Intended use: ${card.intended_use}`);

  showOperatingPoints(card, add);
  const splits = Object.entries(card.metrics);
  if (!splits.length) add("p", "No evaluation yet (bonefrac evaluate RUN --split test).");
  for (const [split, evaluation] of splits) {
    const table = add("table", "");
    const caption = document.createElement("caption");
    caption.textContent = `${split} split: ${evaluation.n_files} files, ${evaluation.n_groups} groups; ` +
      `${evaluation.ci}${evaluation.leaky ? " — LEAKY" : ""}${evaluation.synthetic_data ? " — SYNTHETIC" : ""}`;
    table.append(caption);
    const head = document.createElement("thead");
    table.append(head);
    const headRow = document.createElement("tr");
    head.append(headRow);
    for (const title of ["metric", "value", "95 % CI"]) cell(headRow, title, true);
    const body = document.createElement("tbody");
    table.append(body);
    for (const metric of Object.values(evaluation.metrics)) {
      const row = document.createElement("tr");
      body.append(row);
      cell(row, metric.name, true);
      cell(row, fixed(metric.point));
      cell(row, metric.low === null ? "n/a" : `[${fixed(metric.low)}, ${fixed(metric.high)}]`);
    }
  }
}

function interval(entry) {
  if (!entry) return "n/a";
  return entry.low === null ? fixed(entry.point) : `${fixed(entry.point)} [${fixed(entry.low)}, ${fixed(entry.high)}]`;
}

// The operating points of the card as a table, and in the selector above the drop zone.
function showOperatingPoints(card, add) {
  const points = card.operating_points;
  if (!points.length) return;
  const select = $("#operating-point");
  select.replaceChildren();
  const table = add("table", "");
  const caption = document.createElement("caption");
  caption.textContent = "Operating points: thresholds chosen on validation, then applied once to test";
  table.append(caption);
  const headRow = document.createElement("tr");
  table.append(document.createElement("thead"));
  table.tHead.append(headRow);
  for (const title of ["operating point", "threshold", "val sensitivity", "val specificity",
    "test sensitivity [95 % CI]", "test specificity [95 % CI]"]) cell(headRow, title, true);
  const body = document.createElement("tbody");
  table.append(body);
  for (const point of points) {
    const row = document.createElement("tr");
    body.append(row);
    cell(row, point.name + (point.in_use ? " (default)" : ""), true);
    cell(row, point.threshold.toFixed(4));
    cell(row, fixed(point.val.sensitivity));
    cell(row, fixed(point.val.specificity));
    cell(row, interval(point.test && point.test.sensitivity));
    cell(row, interval(point.test && point.test.specificity));
    const option = document.createElement("option");
    option.value = point.name;
    option.textContent = `${point.name}: threshold ${point.threshold.toFixed(3)}, val sensitivity ` +
      `${fixed(point.val.sensitivity)}, specificity ${fixed(point.val.specificity)}`;
    option.selected = point.in_use;
    select.append(option);
  }
  $("#operating-point-control").hidden = false;
}

function reanalyse() {
  for (const entry of entries) ask(entry);
}

function heatmapsForAll() {
  for (const entry of entries) {
    if (entry.answer && !entry.answer.heatmap) {
      entry.heatmap = true;
      ask(entry);
    }
  }
}

function clearResults() {
  entries = [];
  $("#results").replaceChildren();
  $("#summary tbody").replaceChildren();
  $("#batch").hidden = true;
  $("#no-results").hidden = false;
  setStatus("");
}

function setUp() {
  const drop = $("#drop");
  const picker = $("#files");
  picker.addEventListener("change", () => {
    if (picker.files.length) analyse([...picker.files]);
    picker.value = "";
  });
  drop.addEventListener("click", () => picker.click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      picker.click();
    }
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) analyse([...event.dataTransfer.files]);
  });
  $("#operating-point").addEventListener("change", reanalyse);
  $("#download-csv").addEventListener("click", downloadCsv);
  $("#heatmap-all").addEventListener("click", heatmapsForAll);
  $("#clear").addEventListener("click", clearResults);
  showCard();
}

document.addEventListener("DOMContentLoaded", setUp);
