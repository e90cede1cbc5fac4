// The page's behaviour: send the chosen files one by one to /v1/predict, show each answer, and the model card.
// Plain JavaScript with no library and no build step; everything comes from this server, so it works offline.
// File names and server text are put into the page with textContent only, never as HTML.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
let resultCount = 0;
let shownFiles = []; // the files of the results on the page: asked again when the operating point changes

function setStatus(text) {
  $("#status").textContent = text;
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

async function analyse(files) {
  const heatmap = $("#want-heatmap").checked;
  const select = $("#operating-point");
  const point = select.value;
  select.disabled = true; // one operating point per round of answers
  shownFiles = shownFiles.concat(files);
  let done = 0;
  for (const file of files) {
    setStatus(`Analysing ${file.name} (${done + 1} of ${files.length})…`);
    const body = new FormData();
    body.append("file", file, file.name);
    if (point) body.append("operating_point", point);
    try {
      const response = await fetch(`/v1/predict?heatmap=${heatmap}&image=true`, { method: "POST", body });
      const answer = await response.json();
      if (response.ok) {
        showResult(answer);
      } else {
        showError(file.name, response.status, answer.detail || response.statusText);
      }
    } catch (error) {
      showError(file.name, 0, `the server could not be reached (${error.message})`);
    }
    done += 1;
  }
  select.disabled = false;
  setStatus(`Done: ${done} file${done === 1 ? "" : "s"} analysed.`);
}

function newResult(name) {
  $("#no-results").hidden = true;
  const node = $("#result-template").content.firstElementChild.cloneNode(true);
  resultCount += 1;
  node.id = `result-${resultCount}`;
  $(".file", node).textContent = name;
  $("#results").prepend(node);
  return node;
}

function showError(name, status, detail) {
  const node = newResult(name);
  $(".layout", node).remove();
  const message = document.createElement("p");
  message.className = "error";
  message.setAttribute("role", "alert");
  message.textContent = `Not analysed${status ? ` (HTTP ${status})` : ""}: ${detail}`;
  node.append(message);
}

function showResult(answer) {
  const node = newResult(answer.file);
  const id = node.id;

  const xray = $(".xray", node);
  xray.src = `data:image/png;base64,${answer.image_png}`;
  xray.alt = `the uploaded image ${answer.file} (${answer.image.width}×${answer.image.height}, ${answer.image.format})`;
  const heat = $(".heat", node);
  const slider = $(".opacity", node);
  const sliderLabel = $(".opacity-label", node);
  slider.id = `${id}-opacity`;
  sliderLabel.htmlFor = slider.id;
  if (answer.heatmap) {
    heat.src = `data:image/png;base64,${answer.heatmap.heatmap_png}`;
    heat.alt = `Grad-CAM heatmap for class ${answer.heatmap.target}, laid over the image`;
    const setOpacity = () => {
      heat.style.opacity = slider.value / 100;
      slider.setAttribute("aria-valuetext", `${slider.value} %`);
    };
    slider.addEventListener("input", setOpacity);
    setOpacity();
    $(".heat-caption", node).textContent = answer.heatmap.flat
      ? "Grad-CAM: the map is flat, it points nowhere in particular."
      : `Grad-CAM for “${answer.heatmap.target}”: red where the image moved that score most. ` +
        "Where the model looked, not proof of a fracture.";
  } else {
    heat.remove();
    $(".opacity-control", node).remove();
    $(".heat-caption", node).textContent = "No heatmap asked for.";
  }

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
    const response = await fetch("/v1/model");
    card = await response.json();
  } catch (error) {
    box.textContent = `The model card could not be loaded (${error.message}).`;
    return;
  }
  box.replaceChildren();
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
  add("p", card.disclaimer, "disclaimer-inline");
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
  const files = shownFiles;
  shownFiles = [];
  $("#results").replaceChildren();
  $("#no-results").hidden = files.length > 0;
  if (files.length) analyse(files);
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
  showCard();
}

document.addEventListener("DOMContentLoaded", setUp);
