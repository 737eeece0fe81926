// sdtrain ui: display only. Every check, scan and edit happens on the server, in the toolkit's code.
"use strict";

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child));
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

const url = (path, params) => `${path}?${new URLSearchParams(params)}`;

function say(target, text, kind = "") {
  target.textContent = text;
  target.className = `message ${kind}`;
}

function table(node, header, rows) {
  node.replaceChildren(el("tr", {}, header.map((cell) => el("th", {}, cell))), ...rows.map((row) => el("tr", {}, row.map((cell) => el("td", {}, cell)))));
}

// --- pages ------------------------------------------------------------------------------------

function showPage(name) {
  document.querySelectorAll("header nav button").forEach((b) => b.classList.toggle("active", b.dataset.page === name));
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("active", p.id === `page-${name}`));
  if (name === "runs") follow(selectedRun);
}

// --- Data -------------------------------------------------------------------------------------

let dataset = null;

async function openDataset() {
  const folder = $("#dataset-folder").value.trim();
  const resolution = $("#dataset-resolution").value.trim();
  say($("#dataset-message"), "Reading the dataset...");
  try {
    dataset = await api(url("/api/dataset", resolution ? { folder, resolution } : { folder }));
  } catch (err) {
    say($("#dataset-message"), err.message, "error");
    return;
  }
  say($("#dataset-message"), "");
  renderDataset();
}

function renderDataset() {
  const view = dataset;
  $("#dataset-view").hidden = false;
  $("#dataset-how").textContent = `${view.folder}: read ${view.how}; resolution ${view.resolution}; buckets ${view.buckets_described}`;
  table($("#dataset-subsets"), ["subset", "kind", "repeats", "images", "usable"],
    view.subsets.map((s) => [s.name, s.reg ? "reg" : "train", s.repeats, s.images, s.usable]));
  table($("#dataset-buckets"), ["bucket", "images", "samples"],
    Object.entries(view.buckets).map(([bucket, row]) => [bucket, row.images, row.samples]));
  const problems = view.problems.length ? view.problems : [{ fatal: false, text: "none" }];
  $("#dataset-problems").replaceChildren(...problems.map((p) =>
    el("li", { class: p.fatal ? "error" : (p.text === "none" ? "ok" : "warning") }, p.fatal ? "ERROR: " : (p.text === "none" ? "" : "WARNING: "), p.text)));
  $("#dataset-tags").replaceChildren(...view.subsets.map((s) =>
    el("p", {}, el("strong", {}, `${s.name}: `), Object.entries(s.tags).slice(0, 40).map(([tag, count]) => el("span", { class: "tag" }, `${tag} (${count})`)))));
  $("#dataset-images").replaceChildren(...view.items.map(imageCard));
}

function imageCard(item) {
  const text = el("textarea", { rows: 3, "data-image": item.image }, item.caption);
  const source = item.caption_source === "file" ? "caption file" : `no caption file: using ${item.caption_source}`;
  const save = el("button", { onclick: () => saveCaption(item, text.value) }, "Save caption");
  if (!item.editable) { text.disabled = true; save.disabled = true; }
  return el("div", { class: "card" },
    el("img", { src: url("/api/thumbnail", { path: item.image }), alt: item.name }),
    el("div", {}, item.name),
    el("div", { class: "meta" }, `${item.subset} · ${item.size.join("x")} → bucket ${item.bucket.join("x")} · ×${item.repeats}`),
    el("div", { class: item.caption_source === "file" ? "meta" : "meta warning" }, source),
    text, save);
}

async function saveCaption(item, caption) {
  try {
    await api("/api/dataset/caption", { folder: dataset.folder, image: item.image, caption, expected: item.caption_source === "file" ? item.caption : "" });
    await openDataset();
    say($("#dataset-message"), `Saved the caption of ${item.name}.`, "ok");
  } catch (err) {
    say($("#dataset-message"), err.message, "error");
  }
}

async function applyTags() {
  const body = { folder: dataset.folder, operation: $("#tag-operation").value, tag: $("#tag-name").value, new_tag: $("#tag-new").value, first: $("#tag-first").checked };
  try {
    const result = await api("/api/dataset/tags", body);
    await openDataset();
    say($("#dataset-message"), `Changed ${result.changed.length} caption files${result.changed.length ? ": " + result.changed.join(", ") : ""}.`, "ok");
  } catch (err) {
    say($("#dataset-message"), err.message, "error");
  }
}

// --- Recipe -----------------------------------------------------------------------------------

let recipeId = null;
let checkTimer = null;

async function loadRecipeChoices() {
  const { recipes } = await api("/api/recipes");
  $("#recipe-choice").replaceChildren(...recipes.map((r) => el("option", { value: r.id }, r.label)));
  const saved = recipes.filter((r) => r.id.startsWith("root:"));
  const current = $("#run-recipe").value;
  $("#run-recipe").replaceChildren(...saved.map((r) => el("option", { value: r.id.slice(5) }, r.label)));
  if (current) $("#run-recipe").value = current;
}

function fieldInput(field) {
  const attrs = { "data-key": field.key, id: `key-${field.key}` };
  if (field.kind === "bool") {
    const choices = field.optional ? ["", "true", "false"] : ["true", "false"];
    const select = el("select", attrs, choices.map((c) => el("option", { value: c }, c || "null")));
    select.value = field.value;
    return select;
  }
  if (field.kind === "list" || field.kind === "list_of_sections") {
    return el("textarea", { ...attrs, rows: Math.max(2, field.value.split("\n").length) }, field.value);
  }
  return el("input", { ...attrs, value: field.value, placeholder: field.optional ? "null" : "" });
}

async function loadRecipe() {
  recipeId = $("#recipe-choice").value;
  let recipe;
  try {
    recipe = await api(url("/api/recipe", { id: recipeId }));
  } catch (err) {
    say($("#recipe-status"), err.message, "error");
    return;
  }
  const sections = new Map();
  for (const field of recipe.fields) {
    if (!sections.has(field.section)) sections.set(field.section, el("fieldset", {}, el("legend", {}, field.section)));
    sections.get(field.section).append(el("div", { class: "field" },
      el("label", { for: `key-${field.key}` }, field.key), fieldInput(field),
      el("div", { class: "help" }, `${field.type}${field.help ? " — " + field.help : ""}`)));
  }
  $("#recipe-form").replaceChildren(...sections.values());
  $("#recipe-yaml").textContent = recipe.yaml;
  say($("#recipe-status"), `${recipeId}: valid.`, "ok");
}

function formValues() {
  const values = {};
  document.querySelectorAll("#recipe-form [data-key]").forEach((input) => { values[input.dataset.key] = input.value; });
  return values;
}

async function checkRecipe() {
  try {
    const result = await api("/api/recipe/check", { recipe: recipeId, values: formValues() });
    $("#recipe-yaml").textContent = result.yaml;
    say($("#recipe-status"), result.overrides.length ? `Valid. Changed: ${result.overrides.join("  ")}` : "Valid.", "ok");
    return true;
  } catch (err) {
    say($("#recipe-status"), err.message, "error");
    return false;
  }
}

async function saveRecipe() {
  try {
    const { saved } = await api("/api/recipe/save", { recipe: recipeId, values: formValues(), name: $("#recipe-name").value });
    await loadRecipeChoices();
    $("#run-recipe").value = saved;
    say($("#recipe-status"), `Saved ${saved}. Queue it on the Runs page.`, "ok");
  } catch (err) {
    say($("#recipe-status"), err.message, "error");
  }
}

// --- Runs -------------------------------------------------------------------------------------

let selectedRun = null;
let events = null;

async function startRun() {
  try {
    const entry = await api("/api/runs/start", { recipe: $("#run-recipe").value, overrides: $("#run-overrides").value, overwrite: $("#run-overwrite").checked });
    say($("#runs-message"), `Queued ${entry.recipe} into ${entry.output_dir}.`, "ok");
    follow(entry.output_dir);
  } catch (err) {
    say($("#runs-message"), err.message, "error");
  }
}

async function runAction(path, body, done) {
  try {
    await api(path, body);
    say($("#runs-message"), done, "ok");
  } catch (err) {
    say($("#runs-message"), err.message, "error");
  }
}

function follow(run) {
  selectedRun = run;
  if (events) events.close();
  events = new EventSource(url("/api/events", run ? { run } : {}));
  events.onmessage = (message) => renderRuns(JSON.parse(message.data));
}

function renderRuns(state) {
  $("#run-queue").replaceChildren(...(state.list.queue.length ? state.list.queue.map((entry) =>
    el("li", {}, `${entry.recipe} → ${entry.output_dir}${entry.resume ? " (resume)" : ""} `,
      el("button", { onclick: () => runAction("/api/queue/cancel", { id: entry.id }, "Removed from the queue.") }, "cancel"))) : [el("li", {}, "empty")]));
  const list = $("#run-list");
  table(list, ["run", "state", "checkpoint", "artifacts"], []);
  for (const run of state.list.runs) {
    const row = el("tr", { class: `selectable${run.run === selectedRun ? " selected" : ""}`, onclick: () => follow(run.run) },
      el("td", {}, run.run), el("td", { class: `state-${run.state}` }, run.state),
      el("td", {}, run.checkpoint_step ?? "-"), el("td", {}, run.artifacts.length));
    list.append(row);
  }
  if (state.error) say($("#runs-message"), state.error, "error");
  if (state.detail) renderDetail(state.detail);
}

function duration(seconds) {
  if (seconds == null) return "-";
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

function renderDetail(run) {
  $("#run-detail").hidden = false;
  $("#run-title").textContent = `${run.run} (${run.method})`;
  const last = (series) => (series.length ? series[series.length - 1][1].toPrecision(4) : "-");
  $("#run-progress").replaceChildren(el("span", { class: `state-${run.state}`, id: "run-state" }, run.state),
    ` · step ${run.step ?? 0} of ${run.max_steps ?? "?"} · loss ${last(run.loss)} · lr ${last(run.lr)} · ETA ${duration(run.eta_seconds)}`);
  $("#run-stop").disabled = run.state !== "running";
  $("#run-resume").disabled = run.state === "running" || run.checkpoint_step == null;
  chart($("#loss-chart"), run.loss, "#0b63c5");
  chart($("#lr-chart"), run.lr, "#b5540b");
  const samples = run.samples.slice(-8).reverse();
  $("#samples").replaceChildren(...samples.map((path) =>
    el("figure", {}, el("img", { src: url("/api/file", { path }), alt: path, width: 128 }), el("figcaption", {}, path.split("/").pop()))));
  $("#artifacts").replaceChildren(...run.artifacts.map((path) => el("li", {}, el("a", { href: url("/api/file", { path }), download: "" }, path))));
  $("#evaluations").replaceChildren(...(run.evaluations.length ? run.evaluations.map((path) => el("li", {}, el("a", { href: url("/api/file", { path }), target: "_blank" }, path))) : [el("li", {}, "none (sdtrain eval concept on a toy-base run)")]));
  const log = $("#run-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = run.log;
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function chart(canvas, points, color) {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = 34;
  canvas.dataset.points = points.length;
  context.clearRect(0, 0, width, height);
  context.fillStyle = "#5d6878";
  context.font = "11px sans-serif";
  if (!points.length) { context.fillText("no steps logged yet", pad, height / 2); return; }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const x = (v) => pad + ((v - x0) / (x1 - x0)) * (width - pad - 8);
  const y = (v) => height - 16 - ((v - y0) / (y1 - y0)) * (height - 28);
  context.strokeStyle = "#dde2e8";
  context.strokeRect(pad, 8, width - pad - 8, height - 24);
  context.fillText(y1.toPrecision(3), 2, 14);
  context.fillText(y0.toPrecision(3), 2, height - 16);
  context.fillText(`step ${x0}`, pad, height - 3);
  context.fillText(`${x1}`, width - 30, height - 3);
  context.strokeStyle = color;
  context.beginPath();
  points.forEach((p, i) => (i ? context.lineTo(x(p[0]), y(p[1])) : context.moveTo(x(p[0]), y(p[1]))));
  context.stroke();
}

// --- start ------------------------------------------------------------------------------------

async function start() {
  // The token of a non-local UI is now a cookie: keep it out of the address bar (and of screenshots).
  if (location.search.includes("token=")) history.replaceState(null, "", location.pathname);
  document.querySelectorAll("header nav button").forEach((b) => b.addEventListener("click", () => showPage(b.dataset.page)));
  $("#dataset-open").addEventListener("click", openDataset);
  $("#dataset-folder").addEventListener("keydown", (e) => { if (e.key === "Enter") openDataset(); });
  $("#tag-apply").addEventListener("click", applyTags);
  $("#recipe-load").addEventListener("click", loadRecipe);
  $("#recipe-form").addEventListener("input", () => { clearTimeout(checkTimer); checkTimer = setTimeout(checkRecipe, 300); });
  $("#recipe-save").addEventListener("click", saveRecipe);
  $("#run-start").addEventListener("click", startRun);
  $("#run-stop").addEventListener("click", () => runAction("/api/runs/stop", { run: selectedRun }, `Stopping ${selectedRun}; its last checkpoint stays.`));
  $("#run-resume").addEventListener("click", () => runAction("/api/runs/resume", { run: selectedRun, max_steps: $("#run-until").value || null }, `Queued a resume of ${selectedRun}.`));
  const { root, folders } = await api("/api/folders");
  $("#root-folder").textContent = root;
  $("#folder-list").replaceChildren(...folders.map((f) => el("option", { value: f })));
  await loadRecipeChoices();
}

start();
