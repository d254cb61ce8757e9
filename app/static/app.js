// The FaceID page: jobs (list, start, cancel, resume), a job's curves and ROC, compare, models,
// and /verify on two photos. Plain DOM over the REST API; the API key stays in sessionStorage.
"use strict";

const { lineChart } = window.FaceIDPlot;
const view = document.getElementById("view");
const banner = document.getElementById("banner");
const KEY = "faceid-api-key";
const ACTIVE = ["queued", "running"];
const METRICS = ["acc", "auc", "tar_1e-2", "tar_1e-3", "pairs_acc", "pairs_auc"];
let timer = null;

// --- small helpers -------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}
const num = (v, d = 4) => (v === null || v === undefined || !isFinite(v) ? "–" : (+v).toFixed(d));
const short = (id) => (id ? id.slice(0, 8) : "");
function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min` : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}
let bannerTimer = null;
function say(msg, kind) {
  clearTimeout(bannerTimer);
  banner.hidden = !msg;
  banner.textContent = msg || "";
  banner.className = kind || "";
  if (msg && kind === "info") bannerTimer = setTimeout(() => say(""), 4000);  // errors stay until the next action
}

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(method, path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers["X-API-Key"] = key;
  let payload;
  if (body instanceof FormData) payload = body;
  else if (body !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  const r = await fetch(path, { method, headers, body: payload });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { detail: text }; }
  if (!r.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : r.statusText;
    if (r.status === 401) document.getElementById("api-key").focus();
    throw new ApiError(r.status, `${r.status}: ${detail}`);
  }
  return data;
}

function statusCell(job) {
  return h("span", { class: `status ${job.status}`, "data-status": job.status }, job.status);
}
function progressCell(p) {
  if (!p) return "–";
  if (p.phase === "faces" && p.faces_total) {
    return `finding faces ${p.faces_set || ""} ${p.faces_done}/${p.faces_total}`;
  }
  const pct = p.percent || 0;
  return h("span", {}, h("span", { class: "bar" }, h("span", { style: `width:${Math.min(100, pct)}%` })),
    `${num(pct, 1)} %`, p.images_per_s ? ` · ${Math.round(p.images_per_s)} img/s` : "",
    p.eta_s && pct < 100 ? ` · ${duration(p.eta_s)} left` : "");
}
// Where the training process's time went (progress.time_split): each part and its share of the wall time
function timeSplit(p) {
  const t = p && p.time_split;
  if (!t || !t.wall_s) return "–";
  const part = (name, s) => `${name} ${duration(s)} (${Math.round((100 * s) / t.wall_s)}%)`;
  return [part("train", t.train_s), part("setup", t.setup_s), part("eval", t.eval_s),
    part("checkpoints", t.checkpoint_s)].join(" · ");
}
function best(job) {
  return job.best && job.best.value !== null && job.best.value !== undefined
    ? `${job.best.metric} ${num(job.best.value)} (epoch ${job.best.epoch})` : "–";
}

// --- served model in the header --------------------------------------------------------------
async function refreshServed() {
  const el = document.getElementById("served");
  try {
    const m = await api("GET", "/model");
    el.textContent = `model: ${short(m.id)}${m.pinned ? " (pinned)" : ""}`;
    return m;
  } catch (e) {
    el.textContent = e.status === 503 ? "model: none yet" : "model: ?";
    return null;
  }
}

// --- jobs ----------------------------------------------------------------------------------
async function jobsView() {
  const list = h("div", {}, "loading…");
  const form = newJobForm();
  view.replaceChildren(h("h2", {}, "Jobs"), list, h("h2", {}, "Start a job"), form);
  const selected = new Set();
  async function refresh() {
    const data = await api("GET", "/jobs?limit=100");
    const rows = data.jobs.map((j) => h("tr", { "data-job": j.id },
      h("td", {}, h("input", { type: "checkbox", title: "compare", checked: selected.has(j.id),
        onchange: (e) => (e.target.checked ? selected.add(j.id) : selected.delete(j.id)) })),
      h("td", {}, h("a", { href: `#/jobs/${j.id}` }, short(j.id))),
      h("td", {}, statusCell(j)),
      h("td", {}, progressCell(j.progress)),
      h("td", { class: "num" }, best(j)),
      h("td", {}, `${j.config.preset || "custom"} · ${j.config.train_mode} · ${j.config.img_size} px`),
      h("td", {}, (j.created_at || "").replace("T", " ").slice(0, 19)),
      h("td", {}, jobActions(j, refresh))));
    const compare = h("button", { class: "plain", onclick: () => {
      if (selected.size) location.hash = `#/compare/${[...selected].join(",")}`;
    } }, "Compare selected");
    list.replaceChildren(h("table", { id: "jobs" },
      h("tr", {}, ["", "job", "status", "progress", "best", "recipe", "created", ""].map((t) => h("th", {}, t))), rows),
      h("div", { class: "row" }, compare, h("span", { class: "muted" }, `${data.total} job(s)`)));
    return data.jobs.some((j) => ACTIVE.includes(j.status));
  }
  await poll(refresh);
}

function jobActions(job, after) {
  const act = (what) => async () => {
    try { await api("POST", `/jobs/${job.id}/${what}`); say(""); } catch (e) { say(e.message); }
    after();
  };
  const out = [];
  if (ACTIVE.includes(job.status)) out.push(h("button", { class: "plain", onclick: act("cancel") }, "Cancel"));
  if (["cancelled", "failed", "interrupted"].includes(job.status)) out.push(h("button", { class: "plain", onclick: act("resume") }, "Resume"));
  return out;
}

function newJobForm() {
  const field = (label, input, cls) => h("label", { class: cls }, label, input);
  const folders = h("datalist", { id: "data-folders" });
  const pairFiles = h("datalist", { id: "data-pairs" });
  api("GET", "/data").then((d) => {  // suggestions: what lies under the data root
    folders.replaceChildren(...d.folders.map((f) => h("option", { value: f.path }, `${f.people} people`)));
    pairFiles.replaceChildren(...d.pairs_files.map((p) => h("option", { value: p })));
  }).catch(() => {});
  const inputs = {
    train: h("input", { name: "train", value: "sample/train", required: true, list: "data-folders" }),
    val: h("input", { name: "val", value: "sample/val", required: true, list: "data-folders" }),
    pairs_file: h("input", { name: "pairs_file", value: "sample/pairs.txt", placeholder: "none", list: "data-pairs" }),
    preset: h("select", { name: "preset" }, ["cpu-small", "gpu", "finetune", ""].map((p) => h("option", { value: p }, p || "none"))),
    epochs: h("input", { name: "epochs", type: "number", min: 1, placeholder: "preset's" }),
    img_size: h("input", { name: "img_size", type: "number", min: 32, placeholder: "preset's" }),
    init_from: h("input", { name: "init_from", placeholder: "a succeeded job's id (fine-tune)" }),
    // a teacher while training (the server needs the [teacher] extra: docs/CLI.md, Distillation)
    distill: h("select", { name: "distill" }, ["", "dlib"].map((t) => h("option", { value: t }, t || "none"))),
    extra: h("textarea", { name: "extra", placeholder: '{"time_limit_min": 10, "batch_size": 32}' }),
  };
  const submit = h("button", { type: "submit" }, "Start");
  const form = h("form", { class: "grid", id: "new-job" },
    field("train (under the data root)", inputs.train), field("val", inputs.val),
    field("pairs_file", inputs.pairs_file), field("preset", inputs.preset), field("epochs", inputs.epochs),
    field("img_size", inputs.img_size), field("init_from", inputs.init_from), field("teacher (distill)", inputs.distill),
    field("other fields (JSON, as the POST /jobs body)", inputs.extra, "wide"), h("div", {}, submit), folders, pairFiles);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    let body;
    try { body = inputs.extra.value.trim() ? JSON.parse(inputs.extra.value) : {}; } catch (err) {
      say(`other fields: not JSON (${err.message})`); return;
    }
    for (const k of ["train", "val", "pairs_file", "preset", "init_from", "distill"]) if (inputs[k].value.trim()) body[k] = inputs[k].value.trim();
    for (const k of ["epochs", "img_size"]) if (inputs[k].value) body[k] = Number(inputs[k].value);
    submit.disabled = true;
    try {
      const job = await api("POST", "/jobs", body);
      say(`job ${short(job.id)} queued`, "info");
      location.hash = `#/jobs/${job.id}`;
    } catch (err) { say(err.message); } finally { submit.disabled = false; }
  });
  return form;
}

// --- one job ---------------------------------------------------------------------------------
function curves(jobs, metric) {
  return jobs.map((j) => ({ name: short(j.id), points: (j.metrics || []).filter((m) => m.complete !== false)
    .map((m) => [m.epoch, m[metric]]).filter(([, y]) => y !== null && y !== undefined) }));
}

function rocChart(rocs, markers) {
  return lineChart({ title: "ROC of the best epoch (validation pairs)", xLog: true, xMinLog: 1e-5,
    xLabel: "false accept rate (log)", yLabel: "true accept rate", yMin: 0, yMax: 1,
    series: rocs.map(({ name, roc }) => ({ name, points: roc.far.map((f, i) => [f, roc.tar[i]]).filter(([f]) => f > 0) })),
    markers, empty: "no ROC yet: it comes with the first evaluated epoch" });
}

function operatingMarkers(roc, thresholds) {
  const out = [];
  for (const [name, th] of Object.entries(thresholds || {})) {
    if (th === null || th === undefined || !["acc", "far_1e-2", "far_1e-3"].includes(name)) continue;
    // the ROC point whose threshold is the operating point's (the strictest cut at or below it)
    let i = roc.threshold.findIndex((t) => t <= th + 1e-12);
    if (i < 0) i = roc.threshold.length - 1;
    if (roc.far[i] > 0) out.push({ x: roc.far[i], y: roc.tar[i], label: name });
  }
  return out;
}

async function jobView(id) {
  const head = h("div", { class: "cards" });
  const plots = h("div", { class: "plots" });
  const details = h("div");
  view.replaceChildren(h("h2", {}, `Job ${short(id)}`), head, h("h2", {}, "Curves"), plots, details);
  let rocShownFor = null;
  async function refresh() {
    const job = await api("GET", `/jobs/${id}`);
    head.replaceChildren(
      h("div", { class: "card" }, "status", h("b", {}, statusCell(job)), jobActions(job, refresh)),
      h("div", { class: "card" }, "progress", h("b", {}, progressCell(job.progress))),
      h("div", { class: "card" }, "best", h("b", {}, best(job))),
      h("div", { class: "card" }, "thresholds", h("b", {}, Object.entries(job.thresholds || {})
        .map(([k, v]) => `${k} ${num(v, 3)}`).join(" · ") || "–")),
      h("div", { class: "card", id: "time-split" }, "time", h("b", {}, timeSplit(job.progress))));
    const lossPts = (job.metrics || []).filter((m) => m.complete !== false).map((m) => [m.epoch, m.train_loss]);
    const charts = [
      lineChart({ title: "training loss", xLabel: "epoch", xInteger: true, yLabel: "loss", series: [{ name: "train_loss", points: lossPts }] }),
      lineChart({ title: "validation", xLabel: "epoch", xInteger: true, yLabel: "metric", yMin: 0, yMax: 1,
        series: METRICS.map((m) => ({ name: m, points: curves([job], m)[0].points })) }),
    ];
    const bestEpoch = job.best && job.best.epoch;
    if (rocShownFor !== bestEpoch || !plots.querySelector(".roc")) {
      let rocEl;
      try {
        const roc = await api("GET", `/jobs/${id}/roc`);
        rocEl = rocChart([{ name: `epoch ${roc.epoch}`, roc }], operatingMarkers(roc, roc.thresholds));
        rocShownFor = bestEpoch;
      } catch (e) { rocEl = rocChart([], []); }
      charts.push(h("div", { class: "plot roc" }, rocEl));
    } else charts.push(plots.querySelector(".roc"));
    plots.replaceChildren(...charts.map((c) => (c.classList && c.classList.contains("plot") ? c : h("div", { class: "plot" }, c))));
    let logs = { lines: [] };
    try { logs = await api("GET", `/jobs/${id}/logs?tail=40`); } catch (e) { /* a queued job has none */ }
    details.replaceChildren(
      job.error ? h("p", { class: "status failed" }, job.error) : "",
      h("h2", {}, "Config"), h("pre", {}, JSON.stringify(job.config, null, 2)),
      h("h2", {}, "Log (tail)"), h("pre", { id: "log" }, logs.lines.join("\n")));
    return ACTIVE.includes(job.status);
  }
  await poll(refresh);
}

// --- compare ---------------------------------------------------------------------------------
async function compareView(ids) {
  const all = (await api("GET", "/jobs?limit=100")).jobs;
  const chosen = new Set(ids.length ? ids : all.filter((j) => j.metrics && j.metrics.length).slice(0, 2).map((j) => j.id));
  const metric = h("select", {}, METRICS.map((m) => h("option", { value: m }, m)));
  const picker = h("div", { class: "row" }, all.filter((j) => j.metrics && j.metrics.length).map((j) =>
    h("label", {}, h("input", { type: "checkbox", checked: chosen.has(j.id),
      onchange: (e) => { e.target.checked ? chosen.add(j.id) : chosen.delete(j.id); draw(); } }), ` ${short(j.id)} `)),
    "metric ", metric);
  const plots = h("div", { class: "plots" });
  view.replaceChildren(h("h2", {}, "Compare jobs"), picker, plots);
  metric.addEventListener("change", draw);
  async function draw() {
    const jobs = all.filter((j) => chosen.has(j.id));
    const rocs = [];
    for (const j of jobs) {
      try { rocs.push({ name: short(j.id), roc: await api("GET", `/jobs/${j.id}/roc`) }); } catch (e) { /* none yet */ }
    }
    plots.replaceChildren(
      h("div", { class: "plot" }, lineChart({ title: `${metric.value} per epoch`, xLabel: "epoch", xInteger: true, yLabel: metric.value,
        series: curves(jobs, metric.value) })),
      h("div", { class: "plot" }, lineChart({ title: "training loss", xLabel: "epoch", xInteger: true, yLabel: "loss",
        series: curves(jobs, "train_loss") })),
      h("div", { class: "plot roc" }, rocChart(rocs, [])));
  }
  await draw();
}

// --- models ----------------------------------------------------------------------------------
async function modelsView() {
  const served = await refreshServed();
  const jobs = (await api("GET", "/jobs?status=succeeded&limit=100")).jobs;
  const points = served ? Object.entries(served.operating_points || {}).map(([k, p]) => h("tr", {},
    h("td", {}, k), h("td", { class: "num" }, num(p.threshold, 4)),
    h("td", { class: "num" }, p.tar !== undefined ? `TAR ${num(p.tar)}` : `accuracy ${num(p.accuracy)}`),
    h("td", {}, p.negatives ? `${p.negatives} negatives${p.resolved === false ? " (not resolved)" : ""}` : p.pairs ? `${p.pairs} pairs` : ""))) : [];
  const activate = (id, pin) => async () => {
    try { await api("POST", `/models/${id}/activate?pin=${pin}`); say(`serving ${short(id)}`, "info"); } catch (e) { say(e.message); }
    modelsView();
  };
  view.replaceChildren(h("h2", {}, "Served model"),
    served ? h("div", {}, h("div", { class: "cards" },
      h("div", { class: "card" }, "model", h("b", { id: "served-id" }, short(served.id))),
      h("div", { class: "card" }, "source", h("b", {}, `${served.source}${served.pinned ? ", pinned" : ""}`)),
      h("div", { class: "card" }, "input", h("b", {}, `${served.img_size} px${served.faces ? `, align ${served.faces.align}` : ""}`)),
      h("div", { class: "card" }, "epoch", h("b", {}, served.epoch))),
      h("h2", {}, "Operating points"), h("table", {}, h("tr", {}, ["threshold", "cosine", "", "evidence"].map((t) => h("th", {}, t))), points))
      : h("p", { class: "muted" }, "No model yet: a job that succeeds is served."),
    h("h2", {}, "Succeeded jobs"),
    h("table", {}, h("tr", {}, ["job", "best", "recipe", "finished", ""].map((t) => h("th", {}, t))),
      jobs.map((j) => h("tr", {}, h("td", {}, h("a", { href: `#/jobs/${j.id}` }, short(j.id))),
        h("td", { class: "num" }, best(j)), h("td", {}, `${j.config.preset || "custom"} · ${j.config.img_size} px`),
        h("td", {}, (j.finished_at || "").replace("T", " ").slice(0, 19)),
        h("td", {}, served && served.job_id === j.id ? h("b", {}, "serving")
          : [h("button", { class: "plain", onclick: activate(j.id, true) }, "Serve and pin"), " ",
             h("button", { class: "plain", onclick: activate(j.id, false) }, "Serve")])))));
}

// --- try it ----------------------------------------------------------------------------------
function photoPanel(name) {
  const input = h("input", { type: "file", accept: "image/*", name });
  const canvas = h("canvas", { width: 0, height: 0 });
  const note = h("div", { class: "muted" });
  const panel = h("div", { class: "photo" }, h("div", {}, name === "image1" ? "first photo" : "second photo"), input, canvas, note);
  panel.image = null;
  input.addEventListener("change", () => {
    // the previous photo's preview goes, so no face is ever drawn on the wrong photo
    panel.image = null;
    canvas.width = canvas.height = 0;
    note.textContent = "";
    const file = input.files[0];
    if (!file) return;
    const img = new Image();
    img.onload = () => { panel.image = img; drawFace(canvas, img, null); };
    // HEIC, for one, is read by the server but shown by few browsers
    img.onerror = () => { note.textContent = "no preview in this browser; the photo is still sent"; };
    img.src = URL.createObjectURL(file);
  });
  return { panel, input, canvas };
}

function drawFace(canvas, img, face) {
  const scale = img.width < 320 ? 320 / img.width : Math.min(1, 480 / img.width);  // small crops drawn larger
  canvas.width = Math.round(img.width * scale);
  canvas.height = Math.round(img.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  if (!face || !face.box) return false;
  const [x0, y0, x1, y1] = face.box.map((v) => v * scale);
  ctx.strokeStyle = "#2f62d9";
  ctx.lineWidth = 2;
  ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  ctx.fillStyle = "#d9482f";
  for (const [x, y] of face.landmarks || []) ctx.fillRect(x * scale - 2, y * scale - 2, 4, 4);
  return true;
}

function tryView() {
  const a = photoPanel("image1"), b = photoPanel("image2");
  const threshold = h("select", { name: "threshold" }, ["acc", "far_1e-2", "far_1e-3"].map((t) => h("option", { value: t }, t)));
  const result = h("div", { id: "verify-result" });
  const go = h("button", { id: "verify" }, "Verify");
  go.addEventListener("click", async () => {
    if (!a.input.files[0] || !b.input.files[0]) { say("pick two photos first"); return; }
    const body = new FormData();
    body.append("image1", a.input.files[0]);
    body.append("image2", b.input.files[0]);
    body.append("threshold", threshold.value);
    go.disabled = true;
    try {
      const r = await api("POST", "/verify", body);
      say("");
      result.replaceChildren(
        h("div", { class: `verdict ${r.match ? "match" : "nomatch"}` }, r.match ? "Same person" : "Different people"),
        h("p", {}, `similarity ${num(r.similarity)} against threshold ${r.threshold_name} ${num(r.threshold)} · model ${short(r.model)}`));
      let drawn = 0;
      if (a.panel.image && drawFace(a.canvas, a.panel.image, r.face1)) drawn += 1;
      if (b.panel.image && drawFace(b.canvas, b.panel.image, r.face2)) drawn += 1;
      result.dataset.faces = String(drawn);
    } catch (e) { say(e.message); } finally { go.disabled = false; }
  });
  view.replaceChildren(h("h2", {}, "Are these the same person?"), h("div", { class: "try" }, a.panel, b.panel),
    h("div", { class: "row" }, "threshold ", threshold, go), result);
}

// --- galleries -------------------------------------------------------------------------------
function drawFaces(canvas, img, faces) {
  const scale = img.width < 320 ? 320 / img.width : Math.min(1, 560 / img.width);
  canvas.width = Math.round(img.width * scale);
  canvas.height = Math.round(img.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  ctx.font = "bold 14px system-ui, sans-serif";
  for (const f of faces) {
    if (!f.face || !f.face.box) continue;
    const [x0, y0, x1, y1] = f.face.box.map((v) => v * scale);
    ctx.strokeStyle = f.person ? "#1a7f45" : "#b3261e";
    ctx.lineWidth = 2;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const label = `${f.person || "unknown"} ${num(f.score, 2)}`;
    ctx.fillStyle = ctx.strokeStyle;
    ctx.fillRect(x0, Math.max(0, y0 - 18), ctx.measureText(label).width + 8, 18);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x0 + 4, Math.max(13, y0 - 5));
  }
}

async function galleriesView(name) {
  const list = (await api("GET", "/galleries")).galleries;
  const create = h("form", { class: "row", id: "new-gallery" }, h("input", { name: "name", placeholder: "new gallery name", required: true }),
    h("button", { type: "submit" }, "Create"));
  create.addEventListener("submit", async (e) => {
    e.preventDefault();
    const value = create.querySelector("input").value.trim();
    try { await api("POST", "/galleries", { name: value }); location.hash = `#/galleries/${encodeURIComponent(value)}`; }
    catch (err) { say(err.message); }
  });
  const table = h("table", { id: "galleries" }, h("tr", {}, ["gallery", "people", "faces", "status", "model"].map((t) => h("th", {}, t))),
    list.map((g) => h("tr", {}, h("td", {}, h("a", { href: `#/galleries/${encodeURIComponent(g.name)}` }, g.name)),
      h("td", { class: "num" }, g.people), h("td", { class: "num" }, g.faces),
      h("td", {}, g.reembedding ? `${g.status} ${g.reembedding.done}/${g.reembedding.total}` : g.status), h("td", {}, short(g.model)))));
  const parts = [h("h2", {}, "Galleries"), table, create];
  if (name) parts.push(...(await galleryPanel(decodeURIComponent(name))));
  view.replaceChildren(...parts);
}

async function galleryPanel(name) {
  const path = `/galleries/${encodeURIComponent(name)}`;
  const people = (await api("GET", `${path}/people`)).people;
  const person = h("input", { name: "person", placeholder: "person's name", required: true });
  const photos = h("input", { type: "file", name: "images", accept: "image/*", multiple: true, required: true });
  const enroll = h("form", { class: "row", id: "enroll" }, person, photos, h("button", { type: "submit" }, "Enroll"));
  enroll.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = new FormData();
    for (const f of photos.files) body.append("images", f);
    try {
      const r = await api("POST", `${path}/people/${encodeURIComponent(person.value.trim())}/faces`, body);
      say(`enrolled ${r.enrolled.length} photo(s) of ${r.person} (${r.faces} faces now)`, "info");
      galleriesView(encodeURIComponent(name));
    } catch (err) { say(err.message); }
  });
  const probe = h("input", { type: "file", name: "image", accept: "image/*" });
  // min_face: smaller faces than the model's own detection finds (a group photo), at more cost, or
  // only large ones (a selfie), at less
  const minFace = h("select", { name: "min_face" }, [["", "faces the model finds (about 8% of the photo)"],
    ["4", "faces down to 4% of the photo"], ["2", "faces down to 2% (group photos, slower)"],
    ["25", "large faces only (selfies, ID photos; faster)"]]
    .map(([v, t]) => h("option", { value: v }, t)));
  const canvas = h("canvas", { width: 0, height: 0 });
  const answer = h("div", { id: "identify-result" });
  const identify = h("button", { id: "identify" }, "Who is this?");
  identify.addEventListener("click", async () => {
    if (!probe.files[0]) { say("pick a photo first"); return; }
    const body = new FormData();
    body.append("image", probe.files[0]);
    if (minFace.value) body.append("min_face", minFace.value);
    try {
      const r = await api("POST", `${path}/identify`, body);
      say("");
      const faces = r.faces && r.faces.length ? r.faces : [{ face: null, person: r.person, score: r.score }];
      answer.dataset.person = r.person || "";
      answer.replaceChildren(h("div", { class: `verdict ${r.person ? "match" : "nomatch"}` }, r.person || "unknown"),
        h("p", {}, `score ${num(r.score)} against ${r.threshold_name} ${num(r.threshold)} (a person's best face) · `
          + `${faces.length} face(s) · candidates: ${(r.candidates || []).map((c) => `${c.person} ${num(c.score, 3)}`).join(", ")}`));
      const img = new Image();
      img.onload = () => drawFaces(canvas, img, faces);
      img.src = URL.createObjectURL(probe.files[0]);
    } catch (err) { say(err.message); }
  });
  const remove = (who) => async () => {
    try { await api("DELETE", `${path}/people/${encodeURIComponent(who)}`); } catch (err) { say(err.message); }
    galleriesView(encodeURIComponent(name));
  };
  return [h("h2", {}, `Gallery ${name}`),
    h("table", { id: "people" }, h("tr", {}, ["person", "faces", ""].map((t) => h("th", {}, t))),
      people.map((p) => h("tr", {}, h("td", {}, p.name), h("td", { class: "num" }, p.faces),
        h("td", {}, h("button", { class: "plain", onclick: remove(p.name) }, "Delete"))))),
    h("h2", {}, "Enroll"), enroll,
    h("h2", {}, "Identify"), h("div", { class: "row" }, probe, minFace, identify), answer, h("div", { class: "photo" }, canvas)];
}

// --- routing ---------------------------------------------------------------------------------
async function poll(refresh) {
  const again = await refresh();
  if (again) timer = setTimeout(() => poll(refresh).catch((e) => say(e.message)), 2000);
}

async function route() {
  clearTimeout(timer);
  const [, name, arg] = (location.hash || "#/jobs").split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === (name || "jobs"));
  try {
    if (name === "jobs" && arg) await jobView(arg);
    else if (name === "compare") await compareView(arg ? arg.split(",") : []);
    else if (name === "models") await modelsView();
    else if (name === "try") tryView();
    else if (name === "galleries") await galleriesView(arg);
    else await jobsView();
  } catch (e) {
    say(e.status === 401 ? `${e.message} (enter the server's API key above)` : e.message);
  }
  refreshServed();
}

document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = document.getElementById("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
  document.getElementById("api-key").value = "";
  say(key ? "API key set for this browser session" : "API key cleared", "info");
  route();
});
window.addEventListener("hashchange", route);
setInterval(refreshServed, 5000);  // a job that succeeds becomes the served model
route();
