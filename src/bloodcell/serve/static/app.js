// bloodcell page: upload images to /predict, show one card per cell, the differential count,
// Grad-CAM on demand (/explain) and a client-side CSV. No external assets, no framework.
"use strict";

const WBC = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"];
const COLORS = {
  basophil: "#6b4fa3", eosinophil: "#d9622b", erythroblast: "#b8324b", ig: "#c9a227",
  lymphocyte: "#2f6db5", monocyte: "#2c8c7a", neutrophil: "#7a8b2c", platelet: "#8c5a8f",
};

const state = { health: null, result: null, files: [], urls: [], camUrl: null };
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
  setStatus(`Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`, "busy");
  document.body.dataset.busy = "1";
  try {
    const resp = await fetch("/predict", { method: "POST", body: form });
    if (!resp.ok) throw new Error(await errorText(resp));
    const result = await resp.json();
    show(result, files);
    const n = result.predictions.length, bad = result.unreadable.length, out = result.ood_count || 0;
    setStatus(`${n} cell${n === 1 ? "" : "s"} classified` + (bad ? `, ${bad} file${bad === 1 ? "" : "s"} not readable` : "") +
      (out ? `; ${out === n ? "all" : out} of them look${out === 1 ? "s" : ""} unlike the training cells (OOD) and ${out === 1 ? "is" : "are"} not counted` : "") + ".",
      out ? "warn" : "ok");
  } catch (err) {
    setStatus(err.message, "error");
  } finally {
    delete document.body.dataset.busy;
  }
}

function clearResults() {
  for (const u of state.urls) URL.revokeObjectURL(u);
  state.urls = [];
  state.result = null;
  state.files = [];
  $("#results").replaceChildren();
  $("#summary").hidden = true;
}

function show(result, files) {
  clearResults();
  state.result = result;
  // predictions come back in upload order with unreadable files left out: match them by name
  const pool = files.map((f) => ({ file: f, used: false }));
  state.files = result.predictions.map((p) => {
    const hit = pool.find((x) => !x.used && x.file.name === p.path);
    if (hit) hit.used = true;
    return hit ? hit.file : null;
  });
  const cards = result.predictions.map((p, i) => card(p, state.files[i], i));
  $("#results").replaceChildren(...cards);
  summary(result);
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

// the CSV of `bloodcell predict --format csv` (paths are the uploaded file names), with CRLF line ends
function csvText(result) {
  const classes = Object.keys(result.counts);
  const rows = [["path", "label", "confidence", "review", "ood", "ood_score", ...classes.map((c) => `p_${c}`)]];
  const blank = (v) => v === null || v === undefined;
  for (const p of result.predictions) {
    rows.push([p.path, p.label, p.confidence.toFixed(6), p.review, blank(p.ood) ? "" : p.ood,
      blank(p.ood_score) ? "" : p.ood_score.toFixed(3), ...classes.map((c) => p.probabilities[c].toFixed(6))]);
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
