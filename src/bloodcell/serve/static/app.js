// bloodcell page: upload images to /predict, show one card per cell, the differential count,
// Grad-CAM on demand (/explain) and a client-side CSV. Smear photographs (fields) are shown with the boxes of
// every cell found drawn over them (SVG), their counts, and the counts over all photographs.
// No external assets, no framework; text from the server only ever goes through textContent.
"use strict";

const WBC = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"];
const COLORS = {
  basophil: "#6b4fa3", eosinophil: "#d9622b", erythroblast: "#b8324b", ig: "#c9a227",
  lymphocyte: "#2f6db5", monocyte: "#2c8c7a", neutrophil: "#7a8b2c", platelet: "#8c5a8f",
};

const KIND_NAMES = { rbc: "red cells", wbc: "white cells", platelet: "platelets" };
const SVG_NS = "http://www.w3.org/2000/svg";

const state = { health: null, result: null, files: [], fieldFiles: [], urls: [], camUrl: null };
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "style") Object.assign(node.style, v); // CSSOM: allowed by the page's CSP
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

const pct = (x, digits = 1) => `${(100 * x).toFixed(digits)}%`;
const colorOf = (name) => COLORS[name] || "#555";

function setStatus(text, kind = "") {
  const s = $("#status");
  s.textContent = text;
  s.className = `status ${kind}`;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (typeof body.detail === "string") return body.detail;
    return JSON.stringify(body.detail || body);
  } catch (_) {
    return `${resp.status} ${resp.statusText}`;
  }
}

async function loadHealth() {
  try {
    const resp = await fetch("/health");
    if (!resp.ok) throw new Error(await errorText(resp));
    state.health = await resp.json();
    const h = state.health;
    $("#model-info").textContent =
      `model ${h.model} (${h.backend}) · ${h.classes.length} classes · review below ${pct(h.review_threshold, 0)}` +
      (h.ood_check ? " · OOD check on" : " · no OOD check");
    $("#workstation-link").hidden = !h.review;  // this page is /classify beside the workstation at /
    document.body.dataset.ready = "1";
  } catch (err) {
    $("#model-info").textContent = "server not reachable";
    setStatus(`Cannot reach the server: ${err.message}`, "error");
  }
}

async function classify(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  const limit = state.health ? state.health.max_upload_bytes : Infinity;
  const total = files.reduce((n, f) => n + f.size, 0);
  if (total > limit) {
    setStatus(`These ${files.length} files hold ${(total / 1048576).toFixed(1)} MB; the server accepts ` +
      `${(limit / 1048576).toFixed(0)} MB per upload. Choose fewer files.`, "error");
    return;
  }
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const mode = inputMode();
  setStatus(`Reading ${files.length} image${files.length > 1 ? "s" : ""}…`, "busy");
  document.body.dataset.busy = "1";
  try {
    const resp = await fetch(`/predict?input=${encodeURIComponent(mode)}`, { method: "POST", body: form });
    if (!resp.ok) throw new Error(await errorText(resp));
    const result = await resp.json();
    await show(result, files);
    const n = result.predictions.length, bad = result.unreadable.length, out = result.ood_count || 0;
    const fields = result.fields || [];
    const parts = [];
    if (n || !fields.length) {
      parts.push(`${n} cell${n === 1 ? "" : "s"} classified` +
        (out ? `; ${out === n ? "all" : out} of them look${out === 1 ? "s" : ""} unlike the training cells (OOD) and ${out === 1 ? "is" : "are"} not counted` : ""));
    }
    if (fields.length) {
      const t = result.field_summary.totals;
      parts.push(`${fields.length} smear photograph${fields.length === 1 ? "" : "s"} read: ${t.wbc} white cell${t.wbc === 1 ? "" : "s"}, ` +
        `${t.rbc} red cell${t.rbc === 1 ? "" : "s"}, ${t.platelet} platelet${t.platelet === 1 ? "" : "s"} found`);
    }
    if (bad) parts[0] += `, ${bad} file${bad === 1 ? "" : "s"} not readable`;
    setStatus(parts.join("; ") + ".", out || (fields.length && result.field_summary.wbc_ood) ? "warn" : "ok");
  } catch (err) {
    setStatus(err.message, "error");
  } finally {
    delete document.body.dataset.busy;
  }
}

function inputMode() {
  const checked = document.querySelector("input[name=input-mode]:checked");
  return checked ? checked.value : "auto";
}

function clearResults() {
  for (const u of state.urls) URL.revokeObjectURL(u);
  state.urls = [];
  state.result = null;
  state.files = [];
  state.fieldFiles = [];
  $("#results").replaceChildren();
  $("#fields").replaceChildren();
  $("#summary").hidden = true;
}

// width and height of an uploaded image as the browser decodes it (null when it cannot, e.g. TIFF)
async function imageSize(file) {
  try {
    const bitmap = await createImageBitmap(file);
    const size = [bitmap.width, bitmap.height];
    bitmap.close();
    return size;
  } catch (_) {
    return null;
  }
}

// Predictions and fields each come back in upload order, unreadable files left out, names echoed (and names may
// repeat): give each answer the first unused upload of its name after the previous one of its group. A field also
// says its size, which tells apart two uploads of one name read one as a cell, the other as a field.
async function matchFiles(result, files) {
  const fields = result.fields || [];
  const sizes = fields.length ? await Promise.all(files.map(imageSize)) : files.map(() => null);
  const used = files.map(() => false);
  const assign = (entries, fits) => {
    let after = -1;
    return entries.map((entry) => {
      const free = files.map((f, i) => i).filter((i) => i > after && !used[i] && files[i].name === entry.path);
      const i = free.find((k) => fits(entry, k)) ?? free[0];
      if (i === undefined) return null;
      used[i] = true;
      after = i;
      return files[i];
    });
  };
  const sameSize = (f, i) => !sizes[i] || (sizes[i][0] === f.size[0] && sizes[i][1] === f.size[1]);
  state.fieldFiles = assign(fields, sameSize);
  state.files = assign(result.predictions, () => true);
}

async function show(result, files) {
  clearResults();
  state.result = result;
  await matchFiles(result, files);
  const cards = result.predictions.map((p, i) => card(p, state.files[i], i));
  $("#results").replaceChildren(...cards);
  $("#fields").replaceChildren(...(result.fields || []).map((f, i) => fieldCard(f, state.fieldFiles[i], i)));
  summary(result);
  fieldSummary(result);
}

// the label written over a white cell's box, and whether it is flagged (review or OOD: drawn in orange)
function wbcLabel(c) {
  return `${c.label} ${pct(c.confidence, 0)}` + (c.ood ? " OOD" : c.review ? " review" : "");
}

function overlay(f) {
  const [w, h] = f.size;
  const layer = svg("svg", { class: "field-overlay", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", "aria-hidden": "true" });
  const fs = Math.max(10, Math.round(Math.max(w, h) / 45)); // label size in the photograph's pixels
  const labels = svg("g", { class: "labels" });
  f.cells.forEach((c, k) => {
    const [x0, y0, x1, y1] = c.box;
    const flagged = c.kind === "wbc" && Boolean(c.ood || c.review);
    const cls = ["box", `box-${c.kind}`, flagged ? "box-flagged" : ""].filter(Boolean).join(" ");
    const rect = svg("rect", { class: cls, x: x0, y: y0, width: Math.max(0, x1 - x0), height: Math.max(0, y1 - y0), "data-kind": c.kind, "data-index": k });
    const title = c.kind === "wbc" ? `${c.path}: ${wbcLabel(c)}` : `${KIND_NAMES[c.kind] || c.kind} (score ${c.score.toFixed(2)})`;
    rect.append(svg("title", {}, title));
    layer.append(rect);
    if (c.kind === "wbc") {
      const text = wbcLabel(c);
      const tw = text.length * fs * 0.6 + fs * 0.6, th = fs * 1.35;
      const ty = y0 - th >= 0 ? y0 - th : y0; // above the box where there is room, else inside its top
      const tx = Math.min(Math.max(0, x0), Math.max(0, w - tw));
      const g = svg("g", { class: ["box-label", flagged ? "box-flagged" : ""].filter(Boolean).join(" "), "data-path": c.path });
      g.append(svg("rect", { class: "box-label-bg", x: tx, y: ty, width: tw, height: th }),
        svg("text", { class: "box-label-text", x: tx + fs * 0.3, y: ty + fs * 1.02, "font-size": fs }, text));
      labels.append(g);
    }
  });
  layer.append(labels); // labels over every box
  return layer;
}

function fieldCard(f, file, index) {
  const url = file ? URL.createObjectURL(file) : "";
  if (url) state.urls.push(url);
  const [w, h] = f.size;
  const stage = el("div", { class: "field-stage", style: { aspectRatio: `${w} / ${h}` } },
    url ? el("img", { class: "field-photo", src: url, alt: f.path }) : el("span", { class: "no-thumb" }, "no preview"),
    overlay(f));
  const wbc = f.cells.filter((c) => c.kind === "wbc");
  const oodWbc = wbc.filter((c) => c.ood).length, reviewWbc = wbc.filter((c) => c.review).length;
  const classes = Object.entries(f.wbc_classes || {}).filter(([, n]) => n > 0);
  const shown = f.counts || { rbc: "—", platelet: "—", wbc: "—" }; // null: withheld, the note says why
  const classList = el("ul", { class: "field-classes" }, ...classes.map(([c, n]) =>
    el("li", { dataset: { cls: c } }, el("span", { class: "dot", style: { background: colorOf(c) } }), `${c} ${n}`)));
  const counts = el("ul", { class: "field-counts" },
    el("li", { dataset: { kind: "rbc" } }, el("span", { class: "key key-rbc" }), "red cells ", el("strong", {}, shown.rbc)),
    el("li", { dataset: { kind: "platelet" } }, el("span", { class: "key key-platelet" }), "platelets ", el("strong", {}, shown.platelet)),
    el("li", { dataset: { kind: "wbc" } }, el("span", { class: "key key-wbc" }), "white cells ", el("strong", {}, shown.wbc),
      oodWbc ? el("span", { class: "ood-badge" }, `${oodWbc} OOD, not counted`) : "",
      reviewWbc ? el("span", { class: "review-badge" }, `${reviewWbc} review`) : "",
      classes.length ? classList : ""));
  const parts = [
    el("figure", { class: "field-figure" }, stage,
      el("figcaption", { class: "file-name", title: f.path }, `${f.path} · ${w}×${h} px`)),
  ];
  if (f.note) parts.push(el("p", { class: "field-note" }, f.note));
  for (const p of f.problems || []) { // warnings: the counts stand (a severe problem is the note itself)
    if (p.severe || p.code === "no_cells" || f.note.includes(p.message)) continue;
    parts.push(el("p", { class: "field-warning note" }, `warning: ${p.message}`));
  }
  parts.push(counts, el("p", { class: "field-reason note" }, `read as a field: ${f.input_reason}`));
  if (f.scale) parts.push(el("p", { class: "field-scale note" }, `crop scale: ${f.scale}`));
  return el("article", {
    class: "field-card",
    dataset: {
      name: f.path, index: String(index), cells: String(f.cells.length),
      rbc: String(shown.rbc), wbc: String(shown.wbc), platelet: String(shown.platelet),
    },
  }, ...parts);
}

function fieldSummary(result) {
  const box = $("#field-summary");
  const s = result.field_summary;
  box.hidden = !s;
  if (!s) return;
  const t = s.totals, per = s.per_photo;
  const row = (key, name, total, perPhoto) => el("tr", { dataset: { key } },
    el("th", { scope: "row" }, name), el("td", {}, total), el("td", {}, perPhoto === null ? "—" : perPhoto.toFixed(1)));
  $("#field-totals tbody").replaceWith(el("tbody", {},
    row("photos", "photographs", s.photos, null),
    row("rbc", "red cells", t.rbc, per.rbc),
    row("platelet", "platelets", t.platelet, per.platelet),
    row("wbc", "white cells found", t.wbc, per.wbc),
    row("wbc_counted", "white cells counted", s.wbc_counted, null),
    row("wbc_ood", "white cells OOD, not counted", s.wbc_ood, null),
    row("wbc_review", "white cells to review", s.wbc_review, null)));
  $("#field-caption").textContent = `Summed over ${s.photos} photograph${s.photos === 1 ? "" : "s"}.`
    + (s.withheld ? ` Counts withheld for ${s.withheld} (see ${s.withheld === 1 ? "its" : "their"} note).` : "");
  const tbody = el("tbody");
  for (const [c, n] of Object.entries(s.differential)) {
    const p = s.differential_percent[c];
    tbody.append(el("tr", { dataset: { cls: c }, class: n ? "" : "zero" },
      el("th", { scope: "row" }, el("span", { class: "dot", style: { background: colorOf(c) } }), c),
      el("td", {}, n),
      el("td", {}, p === undefined || p === null ? "—" : `${p.toFixed(1)}%`)));
  }
  $("#field-differential tbody").replaceWith(tbody);
  $("#field-differential tfoot").replaceChildren(el("tr", {}, el("th", { scope: "row" }, "counted"), el("td", {}, s.wbc_counted),
    el("td", {}, s.wbc_counted ? "100%" : "—")));
  const flags = s.flags.map((f) => el("li", { class: "flag" }, f));
  if (s.wbc_ood && !s.flags.some((f) => f.includes("(OOD)"))) {
    flags.unshift(el("li", { class: "flag" }, `${s.wbc_ood} white cell${s.wbc_ood === 1 ? " looks" : "s look"} unlike the training cells (OOD): not counted`));
  }
  $("#field-flags").replaceChildren(...flags);
  $("#field-review-note").textContent = s.wbc_review
    ? `${s.wbc_review} of ${t.wbc} white cells are below the review threshold (orange boxes): check them by eye.`
    : "No white cell is below the review threshold.";
}

function card(pred, file, index) {
  const classes = state.health ? state.health.classes : Object.keys(pred.probabilities);
  const url = file ? URL.createObjectURL(file) : "";
  if (url) state.urls.push(url);
  const thumb = el("button", { class: "thumb", type: "button", title: "Show Grad-CAM" },
    url ? el("img", { src: url, alt: pred.path, loading: "lazy" }) : el("span", { class: "no-thumb" }, "no preview"));
  thumb.addEventListener("click", () => explain(index));
  const bars = el("ul", { class: "bars" });
  const ranked = [...classes].sort((a, b) => pred.probabilities[b] - pred.probabilities[a]);
  for (const c of ranked) {
    const p = pred.probabilities[c];
    bars.append(el("li", { class: c === pred.label ? "bar top" : "bar", dataset: { cls: c } },
      el("span", { class: "bar-name" }, c),
      el("span", { class: "bar-track" }, el("span", { class: "bar-fill", style: { width: `${(100 * p).toFixed(1)}%`, background: colorOf(c) } })),
      el("span", { class: "bar-value" }, pct(p))));
  }
  const head = el("div", { class: "card-head" },
    el("span", { class: "label-chip", style: { background: colorOf(pred.label) } }, pred.label),
    el("span", { class: "confidence" }, pct(pred.confidence)));
  if (pred.review) head.append(el("span", { class: "review-badge", title: "calibrated confidence below the review threshold" }, "review"));
  if (pred.ood) {
    const score = pred.ood_score === null || pred.ood_score === undefined ? "" : ` (OOD score ${pred.ood_score.toFixed(1)}` +
      (state.health && state.health.ood_threshold !== null ? ` > ${state.health.ood_threshold.toFixed(1)})` : ")");
    head.append(el("span", {
      class: "ood-badge",
      title: `Out of distribution: this image looks unlike the cells the model was trained on${score}. ` +
        "Its class is unreliable and it is not counted in the differential.",
    }, "OOD"));
  }
  const camButton = el("button", { class: "button subtle cam-button", type: "button" }, "Grad-CAM");
  camButton.addEventListener("click", () => explain(index));
  if (state.health && !state.health.explain) camButton.disabled = true;
  const cardClass = ["cell-card", pred.review ? "needs-review" : "", pred.ood ? "is-ood" : ""].filter(Boolean).join(" ");
  return el("article", {
    class: cardClass,
    dataset: {
      label: pred.label, name: pred.path, confidence: String(pred.confidence), review: String(pred.review),
      ood: pred.ood === null || pred.ood === undefined ? "" : String(pred.ood),
    },
  },
  el("div", { class: "card-top" }, thumb,
    el("div", { class: "card-body" }, head, el("div", { class: "file-name", title: pred.path }, pred.path), camButton)),
  bars);
}

function summary(result) {
  const hasFields = Boolean(result.fields && result.fields.length);
  $("#cell-summary").hidden = hasFields && !result.predictions.length;
  $("#cell-summary-title").hidden = !hasFields;
  const classes = Object.keys(result.counts);
  const tbody = el("tbody");
  for (const c of classes) {
    const isWbc = c in result.wbc_percent;
    tbody.append(el("tr", { dataset: { cls: c }, class: result.counts[c] ? "" : "zero" },
      el("th", { scope: "row" }, el("span", { class: "dot", style: { background: colorOf(c) } }), c),
      el("td", {}, result.counts[c]),
      el("td", {}, `${result.percent[c].toFixed(1)}%`),
      el("td", {}, isWbc ? `${result.wbc_percent[c].toFixed(1)}%` : "—")));
  }
  const n = result.predictions.length;
  const out = result.ood_count || 0;
  const total = result.counted === undefined ? n - out : result.counted; // the cells the counts rest on
  const wbcTotal = classes.filter((c) => c in result.wbc_percent).reduce((n, c) => n + result.counts[c], 0);
  $("#differential tbody").replaceWith(tbody);
  $("#differential tfoot").replaceChildren(el("tr", {}, el("th", { scope: "row" }, "total"), el("td", {}, total),
    el("td", {}, total ? "100%" : "—"), el("td", {}, `${wbcTotal} WBC`)));
  $("#count-caption").textContent = out
    ? `Counts rest on ${total} of ${n} images; ${out} left out as OOD (unlike the training cells).`
    : `Counts rest on all ${n} image${n === 1 ? "" : "s"}` + (result.ood_check ? "; none looks unlike the training cells." : " (no OOD check for this model).");
  $("#count-caption").className = out ? "caption-ood" : "";
  const oodNote = $("#ood-note");
  oodNote.hidden = !out;
  oodNote.className = out && out === n ? "ood-note all" : "ood-note";
  oodNote.replaceChildren(...(out ? [
    el("strong", {}, out === n
      ? `None of the ${n} images looks like the cells this model was trained on (OOD): nothing was counted.`
      : `${out} of ${n} images look unlike the cells this model was trained on (OOD): not counted.`),
    el("span", {}, out === n
      ? " Check the image source (stain, magnification, camera, cropping) or use a model trained on such images."
      : " They are dimmed and marked OOD; their class is unreliable."),
  ] : []));
  // the OOD flag of the result is said by the note above: list the other findings
  const flags = result.flags.filter((f) => !(out && f.includes("(OOD)"))).map((f) => el("li", { class: "flag" }, f));
  $("#flags").replaceChildren(...flags);
  const review = result.predictions.filter((p) => p.review).length;
  $("#review-note").textContent = review
    ? `${review} of ${n} cells are below the review threshold and should be checked by eye (marked “review”).`
    : "No cell is below the review threshold.";
  $("#unreadable").replaceChildren(...result.unreadable.map((u) => el("li", {}, el("strong", {}, u.path), `: ${u.reason}`)));
  $("#unreadable-box").hidden = !result.unreadable.length;
  $("#summary").hidden = false;
}

async function explain(index) {
  const file = state.files[index];
  const pred = state.result && state.result.predictions[index];
  if (!file || !pred) return;
  if (state.health && !state.health.explain) {
    setStatus("Grad-CAM needs the PyTorch model; this server runs an ONNX export.", "error");
    return;
  }
  const dialog = $("#cam-dialog");
  $("#cam-title").textContent = `${pred.path}: ${pred.label} ${pct(pred.confidence)}`;
  const img = $("#cam-image");
  img.removeAttribute("src");
  img.dataset.state = "loading";
  if (!dialog.open) dialog.showModal();
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const resp = await fetch("/explain", { method: "POST", body: form });
    if (!resp.ok) throw new Error(await errorText(resp));
    if (state.camUrl) URL.revokeObjectURL(state.camUrl);
    state.camUrl = URL.createObjectURL(await resp.blob());
    img.src = state.camUrl;
    img.dataset.state = "done";
  } catch (err) {
    img.dataset.state = "error";
    $("#cam-title").textContent = `Grad-CAM failed: ${err.message}`;
  }
}

function csvCell(v) {
  const s = String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

// the CSV of `bloodcell predict --format csv` (paths are the uploaded file names), with CRLF line ends: one row
// per single-cell image, then one per white cell found in a photograph ('<photo>#wbc<k>'); with photographs two
// more columns, input (cell / field) and box (x0 y0 x1 y1 in the photograph's pixels)
function csvText(result) {
  const classes = Object.keys(result.counts);
  const fields = result.fields || [];
  const extra = fields.length > 0;
  const rows = [["path", "label", "confidence", "review", "ood", "ood_score", ...classes.map((c) => `p_${c}`),
    ...(extra ? ["input", "box"] : [])]];
  const blank = (v) => v === null || v === undefined;
  const entries = result.predictions.map((p) => [p, "cell", ""]);
  for (const f of fields) {
    for (const c of f.cells) if (c.kind === "wbc") entries.push([c, "field", c.box.map((v) => v.toFixed(1)).join(" ")]);
  }
  for (const [p, kind, box] of entries) {
    rows.push([p.path, p.label, p.confidence.toFixed(6), p.review, blank(p.ood) ? "" : p.ood,
      blank(p.ood_score) ? "" : p.ood_score.toFixed(3), ...classes.map((c) => p.probabilities[c].toFixed(6)),
      ...(extra ? [kind, box] : [])]);
  }
  return rows.map((r) => r.map(csvCell).join(",")).join("\r\n") + "\r\n";
}

function downloadCsv() {
  if (!state.result) return;
  const text = csvText(state.result);
  const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  const a = el("a", { href: url, download: "bloodcell-predictions.csv" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function setup() {
  const input = $("#file-input");
  const zone = $("#drop-zone");
  input.addEventListener("change", () => { classify(input.files); input.value = ""; });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    classify(e.dataTransfer.files);
  });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  $("#download-csv").addEventListener("click", downloadCsv);
  $("#clear").addEventListener("click", () => { clearResults(); setStatus(""); });
  $("#cam-close").addEventListener("click", () => $("#cam-dialog").close());
  $("#cam-dialog").addEventListener("click", (e) => { if (e.target === e.currentTarget) e.currentTarget.close(); });
  loadHealth();
}

document.addEventListener("DOMContentLoaded", setup);
