// The KQL page: choices -> /api/explain (estimate) -> /api/jobs (run, poll,
// cancel) -> overlay. Every value sent is one the server published in
// /api/options; the server checks them again and writes the query itself.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  options: null,
  image: null,          // id of the chosen sample or upload
  region: null,         // [x0, y0, x1, y1] in model-input pixels, or null
  drag: null,           // the rectangle being dragged; it becomes the region on release
  job: null,            // id of the job being watched
  estimateTimer: null,
  estimateSeq: 0,
  approximateSeq: 0,
  approximateReady: Promise.resolve(),
};
const STAGE = 448;      // CSS pixels of the longer side of the stage

async function api(path, init) {
  const response = await fetch(path, init);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const error = new Error((body && body.error) || `the server answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function showError(message) { $("error").textContent = message || ""; }
function setStatus(message) { $("status").textContent = message || ""; }

function seconds(s) {
  if (s >= 60) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s >= 1) return `${s.toFixed(1)} s`;
  return `${Math.round(s * 1000)} ms`;
}

function fill(select, items, label, value) {
  select.replaceChildren(...items.map((item) => {
    const o = document.createElement("option");
    o.value = value(item);
    o.textContent = label(item);
    return o;
  }));
}

function model() { return state.options.models.find((m) => m.name === $("model").value); }
function mode() { return document.querySelector("input[name=mode]:checked").value; }

function request() {
  const r = {
    image: state.image, model: $("model").value, patch: Number($("patch").value),
    stride: Number($("stride").value), mode: mode(), region: state.region, top: Number($("top").value),
  };
  if (r.mode === "approximate") r.ssim = Number($("ssim").value);
  return r;
}

// ---------------------------------------------------------------- stage
function layoutStage() {
  const [h, w] = model().input;
  const scale = STAGE / Math.max(h, w);
  for (const el of [$("stage"), $("image"), $("overlay")]) {
    el.style.width = `${Math.round(w * scale)}px`;
    el.style.height = `${Math.round(h * scale)}px`;
  }
  drawSelection();
}

function scale() { return $("stage").getBoundingClientRect().width / model().input[1]; }

function drawSelection() {
  const sel = $("selection");
  const shown = state.drag || state.region;
  if (!shown) { sel.hidden = true; return; }
  const s = scale();
  const [x0, y0, x1, y1] = shown;
  Object.assign(sel.style, { left: `${x0 * s}px`, top: `${y0 * s}px`,
                             width: `${(x1 - x0) * s}px`, height: `${(y1 - y0) * s}px` });
  sel.hidden = false;
}

function setRegion(region) {
  state.region = region;
  $("region-text").textContent = region
    ? `crop x ${region[0]}–${region[2]}, y ${region[1]}–${region[3]} (model-input pixels)`
    : "whole image: drag on the image to crop";
  drawSelection();
  scheduleEstimate();
}

function installCropping() {
  const stage = $("stage");
  let start = null;
  const point = (event) => {
    const box = stage.getBoundingClientRect();
    const s = scale();
    const [h, w] = model().input;
    const x = Math.min(Math.max((event.clientX - box.left) / s, 0), w);
    const y = Math.min(Math.max((event.clientY - box.top) / s, 0), h);
    return [x, y];
  };
  const rect = (a, b) => [Math.floor(Math.min(a[0], b[0])), Math.floor(Math.min(a[1], b[1])),
                          Math.ceil(Math.max(a[0], b[0])), Math.ceil(Math.max(a[1], b[1]))];
  stage.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    start = point(event);
    stage.setPointerCapture(event.pointerId);
    event.preventDefault();
  });
  stage.addEventListener("pointermove", (event) => {
    if (!start) return;
    // only drawn: estimates and runs read state.region, which a drag changes on release
    state.drag = rect(start, point(event));
    drawSelection();
  });
  stage.addEventListener("pointerup", (event) => {
    if (!start) return;
    const r = rect(start, point(event));
    start = null;
    state.drag = null;
    // a click (or a sliver) is not a crop: keep what was there
    if (r[2] - r[0] < 4 || r[3] - r[1] < 4) { setRegion(state.lastRegion || null); return; }
    state.lastRegion = r;
    setRegion(r);
  });
  stage.addEventListener("pointercancel", () => { start = null; state.drag = null; drawSelection(); });
}

// ---------------------------------------------------------------- choices
async function chooseImage(id) {
  state.image = id;
  $("image").src = `/api/images/${encodeURIComponent(id)}`;
  $("overlay").hidden = true;
  $("colorbar").hidden = true;
  $("result").hidden = true;
  state.lastRegion = null;
  setRegion(null);
}

async function upload(file) {
  showError("");
  $("upload-note").textContent = `uploading ${file.name}…`;
  try {
    const item = await api("/api/images", {
      method: "POST", body: file,
      headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
    });
    const option = document.createElement("option");
    option.value = item.id;
    option.textContent = `upload: ${item.name} (${item.width}x${item.height})`;
    $("image-select").prepend(option);
    $("image-select").value = item.id;
    $("upload-note").textContent = "";
    await chooseImage(item.id);
  } catch (e) {
    $("upload-note").textContent = "";
    showError(`upload refused: ${e.message}`);
  } finally {
    $("upload").value = "";
  }
}

// Estimates and runs wait for the latest check, so they never send a mode it is about to rule out.
function refreshApproximate() {
  state.approximateReady = updateApproximate();
  return state.approximateReady;
}

async function updateApproximate() {
  const radio = $("mode-approximate");
  // answers can arrive out of order: only the latest request's may change the page
  const seq = ++state.approximateSeq;
  try {
    const a = await api(`/api/approximate?model=${encodeURIComponent($("model").value)}&patch=${$("patch").value}`);
    if (seq !== state.approximateSeq) return;
    radio.disabled = !a.available;
    $("ssim").disabled = !a.available;
    fill($("ssim"), a.ssim, (t) => (a.tau && a.tau[String(t)] !== undefined ? `${t} (τ ${a.tau[String(t)]})` : `${t}`),
         (t) => `${t}`);
    $("approx-note").textContent = a.available ? "" : `Approximate: ${a.reason}`;
  } catch (e) {
    if (seq !== state.approximateSeq) return;
    radio.disabled = true;
    $("approx-note").textContent = `Approximate: ${e.message}`;
  }
  if (radio.disabled && radio.checked) {
    document.querySelector("input[name=mode][value=exact]").checked = true;
  }
}

function scheduleEstimate() {
  clearTimeout(state.estimateTimer);
  state.estimateTimer = setTimeout(estimate, 250);
}

async function estimate() {
  if (!state.image) return;
  const seq = ++state.estimateSeq;
  $("est-note").textContent = "estimating…";
  await state.approximateReady;
  try {
    const e = await api("/api/explain", { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(request()) });
    if (seq !== state.estimateSeq) return;
    $("est-positions").textContent = `${e.positions}`;
    $("est-time").textContent = e.estimated_seconds == null ? "–" : `≈ ${seconds(e.estimated_seconds)}`;
    $("est-speedup").textContent = `${e.speedup.toFixed(2)}× (incremental vs naive FLOPs)`;
    const approx = e.approximate_plan ? ` (${e.approximate_plan}` +
      (e.predicted_ssim == null ? ")" : `, predicted SSIM ${e.predicted_ssim.toFixed(3)}` +
        (e.approximate_plan === "refine" ? " or better, checked while it runs)" : ")")) : "";
    $("est-note").textContent = (e.estimated_seconds == null ? `${e.mode} plan${approx}; ${e.estimate_basis}`
                                                             : `${e.mode} plan${approx}; time estimated from ${e.estimate_basis}`) +
      (e.warnings.length ? ` · ${e.warnings.join(" · ")}` : "");
    if (!state.job) {
      $("explain").textContent = e.explain;
      $("explain-what").textContent = "(plan of the query, not run yet)";
    }
    showError("");
  } catch (err) {
    if (seq !== state.estimateSeq) return;
    for (const id of ["est-positions", "est-time", "est-speedup"]) $(id).textContent = "–";
    $("est-note").textContent = err.message;
    if (err.status === 503) state.estimateTimer = setTimeout(estimate, 3000);  // busy: try again
  }
}

// ---------------------------------------------------------------- running
async function run() {
  showError("");
  $("run").disabled = true;
  await state.approximateReady;
  try {
    const job = await api("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify(request()) });
    state.job = job.id;
    state.started = performance.now();
    $("cancel").disabled = false;
    $("progress").hidden = false;
    $("progress").removeAttribute("value");
    watch(job);
  } catch (e) {
    showError(e.message);
    $("run").disabled = false;
  }
}

async function watch(job) {
  while (job && job.id === state.job) {
    showProgress(job);
    if (["done", "failed", "cancelled"].includes(job.state)) { finish(job); return; }
    await new Promise((resolve) => setTimeout(resolve, 300));
    try {
      job = await api(`/api/jobs/${job.id}`);
    } catch (e) {
      finish({ id: state.job, state: "failed", error: e.message });
      return;
    }
  }
}

function showProgress(job) {
  const bar = $("progress");
  const elapsed = seconds((performance.now() - state.started) / 1000);
  if (job.state === "queued") {
    bar.removeAttribute("value");
    setStatus(`waiting in line: position ${job.position} (${elapsed})`);
  } else if (job.state === "running") {
    const { done, total } = job.progress;
    if (total > 0) { bar.max = total; bar.value = done; } else { bar.removeAttribute("value"); }
    setStatus(job.phase === "occluding" ? `running: ${done} of ${total} positions (${elapsed})`
                                        : `running: ${job.phase}… (${elapsed})`);
  }
}

function finish(job) {
  state.job = null;
  $("cancel").disabled = true;
  $("run").disabled = false;
  $("progress").hidden = true;
  if ($("est-positions").textContent === "–") scheduleEstimate();  // it may have waited for this job
  if (job.state === "done") {
    setStatus("done");
    showResult(job.result, job.files);
  } else if (job.state === "cancelled") {
    setStatus(`cancelled (${job.error || "by you"})`);
  } else {
    setStatus("");
    showError(job.error || "the query failed");
  }
}

function showResult(r, files) {
  $("figure-link").href = files["figure.png"];
  // LABEL TOP k: one map per class from the same run; the picker switches between them
  r.classes.forEach((c, i) => { c.rank = i; c.of = r.classes.length; });
  fill($("class-pick"), r.classes, (c) => `${c.label} (p=${c.probability.toFixed(3)})`, (c) => `${c.label_index}`);
  $("class-pick-label").hidden = r.classes.length < 2;
  $("class-pick").onchange = () => showClass(r.classes.find((c) => `${c.label_index}` === $("class-pick").value), files);
  showClass(r.classes[0], files);
  $("time").textContent = seconds(r.seconds);
  $("result-mode").textContent = r.mode;
  $("result-positions").textContent = `${r.positions}`;
  const quality = [];
  if (r.predicted_ssim != null) quality.push(`predicted SSIM vs exact ${r.predicted_ssim.toFixed(3)}`);
  if (r.estimated_ssim != null) quality.push(`estimated SSIM ${r.estimated_ssim.toFixed(3)} after computing ${r.computed} of ${r.positions} positions`);
  $("result-ssim").textContent = quality.join(" · ");
  $("result-warnings").textContent = r.warnings.join(" · ");
  $("result").hidden = false;
  $("cb-gradient").style.background = `linear-gradient(to right, ${r.colormap.join(", ")})`;
  $("colorbar").hidden = false;
  $("explain").textContent = r.explain;
  $("explain-what").textContent = `(ran: ${r.query})`;
}

function showClass(c, files) {
  $("overlay").src = `${files[c.overlay]}?t=${Date.now()}`;
  $("overlay").hidden = false;
  $("label").textContent = c.label;
  $("label-what").textContent = c.rank === 0 ? "Predicted" : `Class ${c.rank + 1} of the top ${c.of}:`;
  $("probability").textContent = c.probability.toFixed(3);
  $("cb-lo").textContent = c.range[0].toFixed(3);
  $("cb-hi").textContent = c.range[1].toFixed(3);
  $("cb-label").textContent = `P(${c.label}) with the patch at each place; unoccluded ${c.probability.toFixed(3)}`;
}

async function cancel() {
  if (!state.job) return;
  $("cancel").disabled = true;
  setStatus("cancelling…");
  try { await api(`/api/jobs/${state.job}/cancel`, { method: "POST" }); } catch (e) { showError(e.message); }
}

// ---------------------------------------------------------------- start
async function start() {
  try {
    state.options = await api("/api/options");
  } catch (e) {
    showError(`cannot reach the server: ${e.message}`);
    return;
  }
  const o = state.options;
  fill($("image-select"), o.samples, (s) => `${s.name}: ${s.description}`, (s) => s.id);
  fill($("model"), o.models, (m) => `${m.name} (${m.input[0]}x${m.input[1]})`, (m) => m.name);
  fill($("patch"), o.patches, (p) => `${p}`, (p) => `${p}`);
  fill($("stride"), o.strides, (s) => `${s}`, (s) => `${s}`);
  fill($("top"), o.classes, (k) => (k === 1 ? "the predicted class" : `the top ${k} classes (one run)`), (k) => `${k}`);
  $("model").value = o.models.some((m) => m.name === "efficientnet_lite0") ? "efficientnet_lite0" : o.models[0].name;
  $("patch").value = "16";
  $("stride").value = "8";
  const first = o.samples.find((s) => s.name === "coffee") || o.samples[0];
  $("image-select").value = first.id;

  const modelNote = () => { $("model-note").textContent = `weights: ${model().weights}`; };
  modelNote();
  layoutStage();
  installCropping();
  $("image-select").addEventListener("change", () => chooseImage($("image-select").value));
  $("upload").addEventListener("change", () => { if ($("upload").files[0]) upload($("upload").files[0]); });
  $("model").addEventListener("change", () => {
    modelNote(); state.lastRegion = null; state.region = null; layoutStage(); setRegion(null);
    $("overlay").hidden = true; $("colorbar").hidden = true; $("result").hidden = true;
    refreshApproximate();
  });
  $("patch").addEventListener("change", () => { refreshApproximate(); scheduleEstimate(); });
  $("stride").addEventListener("change", scheduleEstimate);
  $("top").addEventListener("change", scheduleEstimate);
  $("ssim").addEventListener("change", scheduleEstimate);
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", scheduleEstimate);
  $("clear-region").addEventListener("click", () => { state.lastRegion = null; setRegion(null); });
  $("run").addEventListener("click", run);
  $("cancel").addEventListener("click", cancel);
  window.addEventListener("resize", drawSelection);
  await refreshApproximate();
  await chooseImage(first.id);
  $("run").disabled = false;
}

document.addEventListener("DOMContentLoaded", start);
