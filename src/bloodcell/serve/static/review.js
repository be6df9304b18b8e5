// bloodcell review workstation: samples kept on the server (/api), a gallery per class, relabel by key or click,
// the count as a lab writes it, sign-off, report and export. No framework, no external assets.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  health: null, labels: [], keys: new Map(), sample: null, cells: [], byId: new Map(), selected: null,
  knownRev: -1, queue: Promise.resolve(), pending: 0, corrections: [],
};
const LETTER_KEYS = { a: "artefact", s: "smudge", x: "unidentified" };
const POLL_MS = 3000;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v;  // CSSOM: the page's CSP refuses style attributes
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

function setStatus(text, kind = "") {
  const s = $("status");
  s.textContent = text;
  s.className = `status ${kind}`;
}

function who() { return $("who").value.trim(); }

function requireWho() {
  if (who()) return true;
  setStatus("Enter your name or initials (Reviewer, at the top) first: every change is kept with who made it.", "error");
  $("who").focus();
  return false;
}

// fetch JSON; throws Error(detail) with .status on a refusal
async function api(path, { method = "GET", json, body } = {}) {
  const opts = { method, headers: {} };
  if (json !== undefined) { opts.body = JSON.stringify(json); opts.headers["Content-Type"] = "application/json"; }
  if (body !== undefined) opts.body = body;
  const resp = await fetch(path, opts);
  if (!resp.ok) {
    let detail = `${resp.status} ${resp.statusText}`;
    try { const j = await resp.json(); if (typeof j.detail === "string") detail = j.detail; } catch (_) { /* not JSON */ }
    const err = new Error(detail);
    err.status = resp.status;
    throw err;
  }
  return resp.json();
}

const sid = () => encodeURIComponent(state.sample.sample_id);
const base = () => `/api/samples/${sid()}`;

// ------------------------------------------------------------------ samples

async function loadSamples() {
  const list = await api("/api/samples");
  const ul = $("sample-list");
  ul.replaceChildren(...list.map((s) => el("li", {},
    el("a", { href: `#/sample/${encodeURIComponent(s.sample_id)}`, class: state.sample && s.sample_id === state.sample.sample_id ? "current" : "" },
      el("span", { class: "sid", text: s.sample_id }),
      el("span", { class: `badge ${s.status}`, text: s.status === "signed" ? `signed v${s.version}` : (s.version > 1 ? `open v${s.version}` : "open") }),
      el("span", { class: "hint", text: ` ${s.date} · ${s.cells} cells` })))));
}

async function createSample(ev) {
  ev.preventDefault();
  if (!requireWho()) return;
  try {
    const s = await api("/api/samples", { method: "POST", json: {
      sample_id: $("new-id").value.trim(), who: who(), date: $("new-date").value || null, note: $("new-note").value } });
    $("new-id").value = ""; $("new-note").value = "";
    location.hash = `#/sample/${encodeURIComponent(s.sample_id)}`;
  } catch (e) { setStatus(e.message, "error"); $("empty-view").hidden || alertEmpty(e.message); }
}

function alertEmpty(text) { $("empty-view").replaceChildren(el("p", { class: "status error", text })); }

async function openSample(sampleId) {
  try {
    state.sample = await api(`/api/samples/${encodeURIComponent(sampleId)}`);
  } catch (e) { alertEmpty(e.message); $("sample-view").hidden = true; $("empty-view").hidden = false; return; }
  $("sample-view").hidden = false;
  $("empty-view").hidden = true;
  state.selected = null;
  setStatus("");
  await reloadCells();
  loadSamples();
}

function showSampleHead() {
  const s = state.sample;
  $("sample-title").textContent = `Sample ${s.sample_id}`;
  const status = s.status === "signed" ? `signed off, version ${s.version}` : `open, version ${s.version}`;
  $("sample-meta").textContent = `${s.date} · ${status} · ${s.cells} cells, ${s.reviewed} looked at · ${s.note || "no note"}`;
  $("signoff").hidden = s.status === "signed";
  $("reopen").hidden = s.status !== "signed";
  $("report").href = `${base()}/report`;
  $("export").href = `${base()}/export.zip`;
  $("wbc-count").value = s.wbc_count ?? "";
  document.body.classList.toggle("locked", s.status === "signed");
}

async function reloadCells() {
  const [sample, cells, corrections] = await Promise.all([api(base()), api(`${base()}/cells`), api(`${base()}/corrections`)]);
  state.sample = sample;
  state.corrections = corrections;
  state.knownRev = sample.rev;
  state.cells = cells;
  state.byId = new Map(cells.map((c) => [c.id, c]));
  showSampleHead();
  renderGallery();
  refreshCount();
  const keep = state.selected && state.byId.has(state.selected) ? state.selected : firstInOrder();
  if (keep) select(keep, false);
  else $("cell-view").hidden = true;
}

// ------------------------------------------------------------------ gallery

// within a class: cells unlike the training cells first, then those the model was unsure of, then the rest
function rank(c) { return (c.ood && !c.reviewed ? 0 : c.review && !c.reviewed ? 1 : 2); }

function renderGallery() {
  const groups = new Map();
  for (const c of state.cells) {
    if (!groups.has(c.label)) groups.set(c.label, []);
    groups.get(c.label).push(c);
  }
  const ordered = [...groups.entries()].sort((a, b) => b[1].length - a[1].length || a[0].localeCompare(b[0]));
  const frag = document.createDocumentFragment();
  for (const [label, cells] of ordered) {
    cells.sort((a, b) => rank(a) - rank(b) || a.id - b.id);
    frag.append(section(label, cells));
  }
  $("gallery").replaceChildren(frag);
  if (!state.cells.length) $("gallery").append(el("p", { class: "hint", text: "No cells yet: add images (single cells or smear photographs)." }));
}

function section(label, cells) {
  const grid = el("div", { class: "grid" });
  for (const c of cells) grid.append(thumb(c));
  return el("section", { class: "class-group", "data-label": label },
    el("h3", {}, el("span", { text: label }), el("span", { class: "n", text: String(cells.length) })), grid);
}

function thumb(c) {
  const fig = el("figure", { class: "thumb", "data-id": c.id, title: `${c.name}: ${c.label}` },
    el("img", { loading: "lazy", src: `${base()}/cells/${c.id}/image?thumb=true`, alt: c.label, width: 72, height: 72 }));
  fig.addEventListener("click", () => select(c.id));
  markThumb(c, fig);
  return fig;
}

function thumbOf(id) { return $("gallery").querySelector(`.thumb[data-id="${id}"]`); }

function markThumb(c, fig = thumbOf(c.id)) {
  if (!fig) return;
  fig.classList.toggle("ood", c.ood && !c.reviewed);
  fig.classList.toggle("unsure", c.review && !c.reviewed);
  fig.classList.toggle("reviewed", c.reviewed);
  fig.classList.toggle("changed", c.label !== c.predicted);
  fig.title = `${c.name}: ${c.label}${c.label !== c.predicted ? ` (model: ${c.predicted})` : ""}`;
}

// move a relabelled cell's thumbnail to its class (section order stays put until the next reload: nothing jumps)
function placeThumb(c) {
  const fig = thumbOf(c.id);
  if (!fig) return;
  const from = fig.closest(".class-group");
  let to = $("gallery").querySelector(`.class-group[data-label="${CSS.escape(c.label)}"]`);
  if (!to) { to = section(c.label, []); $("gallery").append(to); }
  if (from !== to) {
    to.querySelector(".grid").append(fig);
    for (const g of [from, to]) g.querySelector(".n").textContent = String(g.querySelectorAll(".thumb").length);
  }
  markThumb(c, fig);
}

function order() { return [...$("gallery").querySelectorAll(".thumb")].map((f) => Number(f.dataset.id)); }
function firstInOrder() { return order()[0] ?? null; }

function select(id, scroll = true) {
  state.selected = id;
  for (const f of $("gallery").querySelectorAll(".thumb.selected")) f.classList.remove("selected");
  const fig = thumbOf(id);
  if (fig) { fig.classList.add("selected"); if (scroll) fig.scrollIntoView({ block: "nearest" }); }
  showCell(state.byId.get(id));
}

function move(delta) {
  const ids = order();
  if (!ids.length) return;
  const i = ids.indexOf(state.selected);
  const next = ids[Math.min(ids.length - 1, Math.max(0, (i < 0 ? 0 : i) + delta))];
  select(next);
}

function columns() {
  const grid = $("gallery").querySelector(".grid");
  return grid ? Math.max(1, getComputedStyle(grid).gridTemplateColumns.split(" ").length) : 1;
}

function showCell(c) {
  if (!c) { $("cell-view").hidden = true; return; }
  $("cell-view").hidden = false;
  $("cell-big").src = `${base()}/cells/${c.id}/image`;
  $("cam-image").hidden = true;
  const flags = [c.ood && !c.reviewed ? "unlike the training cells: not counted until labelled" : "",
    c.review && !c.reviewed ? "the model was unsure" : "", c.reviewed ? "looked at by a person" : ""].filter(Boolean);
  $("cell-info").replaceChildren(
    el("div", { class: "cell-label", text: c.label }),
    el("div", { class: "hint", text: `model: ${c.predicted} (${(100 * c.confidence).toFixed(1)}%)` +
      (c.ood_score !== null ? ` · OOD score ${c.ood_score.toFixed(2)}` : "") }),
    el("div", { class: "hint", text: c.name }),
    ...flags.map((f) => el("div", { class: "flag", text: f })));
  const probs = Object.entries(c.probabilities).sort((a, b) => b[1] - a[1]).slice(0, 5);
  $("cell-probs").replaceChildren(...probs.map(([k, v]) => el("li", {},
    el("span", { text: k }), el("span", { class: "bar", style: `width:${Math.round(100 * v)}%` }),
    el("span", { class: "n", text: `${(100 * v).toFixed(1)}%` }))));
  $("cell-history").replaceChildren(...state.corrections.filter((h) => h.cell === c.id).map((h) => el("li", {
    text: `${h.undo_of ? "undo" : h.before === h.after ? "confirmed" : `${h.before} → ${h.after}`} · ${h.who} · ${h.at.replace("T", " ").slice(0, 16)} UTC (v${h.version})` })));
  $("cam").hidden = !(state.health && state.health.explain);
  for (const b of $("label-bar").querySelectorAll("button")) b.classList.toggle("current", b.dataset.label === c.label);
}

// ------------------------------------------------------------------ labels and corrections

async function loadLabels() {
  const res = await api("/api/labels");
  state.labels = res.labels;
  state.keys = new Map();
  res.labels.slice(0, 10).forEach((l, i) => state.keys.set(String((i + 1) % 10), l));
  for (const [k, l] of Object.entries(LETTER_KEYS)) if (res.labels.includes(l)) state.keys.set(k, l);
  const keyOf = new Map([...state.keys.entries()].map(([k, l]) => [l, k]));
  $("label-bar").replaceChildren(...res.labels.map((l) => el("button", {
    class: "button label", type: "button", "data-label": l, onclick: () => state.selected && relabel(state.selected, l) },
  keyOf.has(l) ? el("kbd", { text: keyOf.get(l) }) : "", ` ${l}`)));
}

function relabel(id, label) {
  if (!requireWho()) return;
  if (state.sample.status === "signed") { askReopen(); return; }
  const c = state.byId.get(id);
  const before = { label: c.label, reviewed: c.reviewed };
  const t0 = performance.now();
  const ids = order();
  const next = ids[ids.indexOf(id) + 1] ?? id;  // on to the next cell of the class, as a reviewer pages through
  c.label = label; c.reviewed = true;
  placeThumb(c);
  select(next);
  const timing = window.bloodcellTiming = { shown_ms: performance.now() - t0 };
  // after the next frame is painted: what the person actually sees (benchmarks/review_gallery.py)
  requestAnimationFrame(() => setTimeout(() => { timing.painted_ms = performance.now() - t0; }, 0));
  send(async () => {
    try {
      const saved = await api(`${base()}/cells/${id}/label`, { method: "POST", json: { label, who: who(), rev: c.rev } });
      Object.assign(c, saved);
      state.knownRev = Math.max(state.knownRev, saved.sample_rev ?? -1);
      timing.saved_ms = performance.now() - t0;
      markThumb(c);
      setStatus(label === before.label ? `Confirmed cell ${id} as ${label}.` : `Cell ${id}: ${before.label} → ${label}.`, "ok");
      refreshCount();
      refreshHistory();
    } catch (e) {
      Object.assign(c, before);
      placeThumb(c);
      setStatus(e.message, "error");
      if (e.status === 409) await reloadCells();
    }
  });
}

// one change at a time, in the order made: each names the revision the previous one left
function send(job) {
  state.pending += 1;
  state.queue = state.queue.then(job).finally(() => { state.pending -= 1; });
  return state.queue;
}

function undo() {
  if (!requireWho()) return;
  send(async () => {
    try {
      const c = await api(`${base()}/undo`, { method: "POST", json: { who: who() } });
      Object.assign(state.byId.get(c.id), c);
      state.knownRev = Math.max(state.knownRev, c.sample_rev ?? -1);
      placeThumb(state.byId.get(c.id));
      select(c.id);
      setStatus(`Undone: cell ${c.id} is ${c.label} again.`, "ok");
      refreshCount();
      refreshHistory();
    } catch (e) { setStatus(e.message, "error"); if (e.status === 409) await reloadCells(); }
  });
}

// ------------------------------------------------------------------ count, sign-off

async function refreshHistory() {
  const [sample, corrections] = await Promise.all([api(base()), api(`${base()}/corrections`)]);
  if (!state.pending) { state.sample = sample; showSampleHead(); }  // "N looked at" follows the work
  state.corrections = corrections;
  if (state.selected) showCell(state.byId.get(state.selected));
}

async function addClass(ev) {
  ev.preventDefault();
  try {
    await api("/api/labels", { method: "POST", json: { name: $("new-class-name").value.trim(), kind: $("new-class-kind").value } });
    $("new-class-name").value = "";
    await loadLabels();
    setStatus("Class added: it is kept on this server for every sample.", "ok");
  } catch (e) { setStatus(e.message, "error"); }
}

async function refreshCount() {
  if (!state.sample) return;
  const res = await api(`${base()}/count`);
  const fmt = (v, d = 1) => (v === null || v === undefined ? "" : v.toFixed(d));
  $("count-table").tBodies[0].replaceChildren(...res.rows.filter((r) => r.kind === "wbc").map((r) => el("tr", {},
    el("td", { text: r.display }), el("td", { class: "n", text: String(r.cells) }), el("td", { class: "n", text: fmt(r.percent) }),
    el("td", { class: "n", text: fmt(r.absolute, 2) }))),
  el("tr", { class: "total" }, el("th", { text: "White cells" }), el("th", { class: "n", text: String(res.wbc_total) }),
    el("th", { class: "n", text: res.wbc_total ? "100" : "" }), el("th", { class: "n", text: res.wbc_count ?? "" })));
  const others = res.rows.filter((r) => r.kind !== "wbc").map((r) => el("tr", {},
    el("td", { text: r.display }), el("td", { class: "n", text: r.kind === "nrbc" ? `${r.cells} (${fmt(r.percent)} /100 WBC)` : String(r.cells) })));
  if (res.not_counted_ood) others.push(el("tr", {}, el("td", { text: "Not counted (unlike training cells)" }), el("td", { class: "n", text: String(res.not_counted_ood) })));
  $("other-table").tBodies[0].replaceChildren(...others);
  $("flags").replaceChildren(...res.flags.map((f) => el("li", { text: f })));
}

async function signOff() {
  if (!requireWho()) return;
  await state.queue;
  try {
    state.sample = await api(`${base()}/signoff`, { method: "POST", json: { who: who(), rev: state.knownRev } });
    state.knownRev = state.sample.rev;
    showSampleHead();
    setStatus(`Signed off by ${who()} (version ${state.sample.version}): the sample is locked.`, "ok");
    loadSamples();
  } catch (e) { setStatus(e.message, "error"); if (e.status === 409) await reloadCells(); }
}

function askReopen() {
  $("reason").value = "";
  $("reason-dialog").showModal();
}

async function reopen(ev) {
  ev.preventDefault();
  const reason = $("reason").value.trim();
  if (!reason) { $("reason").focus(); return; }
  $("reason-dialog").close();
  try {
    await api(`${base()}/reopen`, { method: "POST", json: { who: who(), reason } });
    await reloadCells();
    setStatus(`Reopened as version ${state.sample.version}: make the change, then sign off again.`, "ok");
    loadSamples();
  } catch (e) { setStatus(e.message, "error"); }
}

async function setWbcCount() {
  if (!requireWho()) return;
  const v = $("wbc-count").value;
  try {
    state.sample = await api(base(), { method: "PATCH", json: v === "" ? { who: who(), clear_wbc_count: true } : { who: who(), wbc_count: Number(v) } });
    state.knownRev = state.sample.rev;
    refreshCount();
  } catch (e) { setStatus(e.message, "error"); $("wbc-count").value = state.sample.wbc_count ?? ""; }
}

async function upload(files) {
  if (!files.length || !requireWho()) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  setStatus(`Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`, "busy");
  try {
    const res = await api(`${base()}/uploads?who=${encodeURIComponent(who())}&input=${$("upload-mode").value}`, { method: "POST", body: form });
    await reloadCells();
    const bad = res.unreadable.map((u) => `${u.path}: ${u.reason}`).join("; ");
    setStatus(`Added ${res.cells.length} cells from ${res.uploads} images.${bad ? ` Not read: ${bad}` : ""}`, bad ? "warn" : "ok");
    loadSamples();
  } catch (e) { setStatus(e.message, "error"); }
  $("upload-input").value = "";
}

async function gradcam() {
  const c = state.byId.get(state.selected);
  const blob = await (await fetch(`${base()}/cells/${c.id}/image`)).blob();
  const form = new FormData();
  form.append("file", blob, `cell${c.id}`);
  const resp = await fetch("/explain", { method: "POST", body: form });
  if (!resp.ok) { setStatus("Grad-CAM failed", "error"); return; }
  $("cam-image").src = URL.createObjectURL(await resp.blob());
  $("cam-image").hidden = false;
}

// another tab or reviewer changed the sample: show their work (never while a change of ours is on its way)
async function poll() {
  if (!state.sample || state.pending || document.hidden) return;
  try {
    const s = await api(base());
    if (s.rev > state.knownRev && !state.pending) {
      await reloadCells();
      setStatus("Updated: this sample was changed in another tab or by another reviewer.", "warn");
    }
  } catch (_) { /* the server may be restarting: the next poll tries again */ }
}

function onKey(ev) {
  if (!state.sample || ev.target.closest("input, textarea, select, dialog") || ev.metaKey || ev.altKey) return;
  if (ev.ctrlKey && ev.key.toLowerCase() === "z") { ev.preventDefault(); undo(); return; }
  if (ev.ctrlKey) return;
  const key = ev.key;
  if (key === "ArrowRight") move(1);
  else if (key === "ArrowLeft") move(-1);
  else if (key === "ArrowDown") move(columns());
  else if (key === "ArrowUp") move(-columns());
  else if (key === "z") undo();
  else if (key === "Enter" && state.selected) relabel(state.selected, state.byId.get(state.selected).label);
  else if (state.keys.has(key) && state.selected) relabel(state.selected, state.keys.get(key));
  else return;
  ev.preventDefault();
}

function route() {
  const m = location.hash.match(/^#\/sample\/(.+)$/);
  if (m) openSample(decodeURIComponent(m[1]));
  else { $("sample-view").hidden = true; $("empty-view").hidden = false; }
}

async function setup() {
  $("who").value = localStorage.getItem("bloodcell.who") || "";
  $("who").addEventListener("change", () => localStorage.setItem("bloodcell.who", who()));
  $("new-date").value = new Date().toISOString().slice(0, 10);
  $("new-sample").addEventListener("submit", createSample);
  $("upload-input").addEventListener("change", (e) => upload([...e.target.files]));
  $("undo").addEventListener("click", undo);
  $("signoff").addEventListener("click", signOff);
  $("reopen").addEventListener("click", askReopen);
  $("reason-form").addEventListener("submit", reopen);
  $("reason-cancel").addEventListener("click", () => $("reason-dialog").close());
  $("wbc-count").addEventListener("change", setWbcCount);
  $("cam").addEventListener("click", gradcam);
  $("new-class").addEventListener("submit", addClass);
  document.addEventListener("keydown", onKey);
  window.addEventListener("hashchange", route);
  try {
    state.health = await api("/health");
    $("model-info").textContent = `${state.health.model} · ${state.health.backend} · bloodcell ${state.health.version}`;
    await loadLabels();
    await loadSamples();
  } catch (e) { $("model-info").textContent = `server unreachable: ${e.message}`; }
  route();
  setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", setup);
