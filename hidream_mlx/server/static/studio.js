// The studio page: queue a job, follow its server-sent events, keep a gallery of this session's images.
"use strict";

const $ = (id) => document.getElementById(id);
const SEED_MAX = 4294967295;
let current = null; // the job being followed

$("token").value = localStorage.getItem("hidream-token") || "";
$("token").addEventListener("change", () => localStorage.setItem("hidream-token", $("token").value));

function newSeed() {
  const words = new Uint32Array(1);
  crypto.getRandomValues(words);
  $("seed").value = String(words[0] % (SEED_MAX + 1));
}
$("new-seed").addEventListener("click", newSeed);
if (!$("seed").value) newSeed();

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if ($("token").value) h["Authorization"] = "Bearer " + $("token").value;
  return h;
}

function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// The strength slider follows the default of what is chosen (0.8 from an image, 1 with a mask)
// until the user moves it.
let strengthTouched = false;
function showStrength() { $("strength-value").textContent = Number($("strength").value).toFixed(2); }
$("strength").addEventListener("input", () => { strengthTouched = true; showStrength(); });
$("mask").addEventListener("change", () => {
  if (!strengthTouched) { $("strength").value = $("mask").files.length ? "1" : "0.8"; showStrength(); }
});

async function bodyFromForm() {
  const body = { prompt: $("prompt").value, seed: Number($("seed").value) };
  if ($("preset").value) body.preset = $("preset").value;
  if ($("size").value.trim()) body.size = $("size").value.trim();
  if ($("no-snap").checked) body.no_snap = true;
  if ($("steps").value) body.steps = Number($("steps").value);
  if ($("guidance").value) body.guidance = Number($("guidance").value);
  const files = Array.from($("refs").files);
  if (files.length) body.references = await Promise.all(files.map(readAsBase64));
  const start = $("init-image").files[0];
  if (start) {
    body.init_image = await readAsBase64(start);
    body.strength = Number($("strength").value);
    if ($("mask").files[0]) body.mask = await readAsBase64($("mask").files[0]);
  }
  return body;
}

function setBusy(busy) {
  $("go").disabled = busy;
  $("cancel").disabled = !busy;
  document.querySelectorAll(".rerender").forEach((b) => { b.disabled = busy; });
}

function showError(message) {
  $("error").textContent = message || "";
}

async function submit(body) {
  showError("");
  const response = await fetch("/v1/jobs", {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) {
    showError(answer.error ? answer.error.message : response.statusText);
    return;
  }
  current = answer.id;
  setBusy(true);
  $("status").textContent = answer.position > 0 ? `queued (place ${answer.position})` : "starting";
  try {
    await follow(answer.id, body);
  } finally {
    current = null;
    setBusy(false);
  }
}

// Server-sent events read through fetch, so the bearer token can travel in a header.
async function follow(jobId, body) {
  const response = await fetch(`/v1/jobs/${jobId}/events`, { headers: headers() });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const line = block.split("\n").find((l) => l.startsWith("data: "));
      if (line) await handle(JSON.parse(line.slice(6)), body);
    }
  }
}

async function handle(event, body) {
  const bar = $("bar");
  if (event.event === "queued") {
    $("status").textContent = `queued (place ${event.position})`;
  } else if (event.event === "started") {
    bar.hidden = false; bar.max = event.steps; bar.value = 0;
    $("status").textContent = `rendering ${event.width}x${event.height}, seed ${event.seed}`;
  } else if (event.event === "progress") {
    bar.value = event.step;
    $("status").textContent = `step ${event.step}/${event.steps} · ${event.seconds_per_step.toFixed(2)} s/step · ` +
      `ETA ${event.eta_seconds.toFixed(1)} s`;
    if (event.preview) { $("preview").src = event.preview; $("preview").hidden = false; }
  } else if (event.event === "image") {
    $("preview").src = event.preview; $("preview").hidden = false;
    await addToGallery(event, body);
  } else if (event.event === "done") {
    $("status").textContent = "done";
  } else if (event.event === "cancelled") {
    $("status").textContent = "cancelled";
  } else if (event.event === "failed") {
    $("status").textContent = "failed";
    showError(event.error);
  }
}

async function addToGallery(event, body) {
  const meta = event.metadata;
  const response = await fetch(`/v1/files/${encodeURIComponent(event.file)}`, { headers: headers() });
  const card = document.createElement("div");
  card.className = "card";
  const img = document.createElement("img");
  img.alt = meta.prompt;
  img.src = URL.createObjectURL(await response.blob());
  const settings = document.createElement("pre");
  const steps = meta.init_image ? `${meta.steps_run} of ${meta.steps} steps (strength ${meta.strength})`
    : `${meta.steps} steps`;
  settings.textContent = `${meta.width}x${meta.height} · seed ${meta.seed} · ${meta.recipe} · ${steps} · ` +
    `guidance ${meta.guidance}${body.preset ? " · preset " + body.preset : ""}\n${meta.prompt}`;
  const again = document.createElement("button");
  again.className = "rerender";
  again.textContent = "re-render at high";
  again.title = "same prompt, seed, references and start image with the high preset (an explicit size is kept)";
  again.addEventListener("click", () => {
    const high = { prompt: body.prompt, seed: meta.seed, preset: "high" };
    for (const key of ["size", "no_snap", "references", "init_image", "mask", "strength"]) {
      if (key in body) high[key] = body[key];
    }
    submit(high);
  });
  card.append(img, settings, again);
  card.dataset.seed = meta.seed;
  card.dataset.steps = meta.steps;
  $("gallery").prepend(card);
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  submit(await bodyFromForm());
});

$("cancel").addEventListener("click", () => {
  if (current) fetch(`/v1/jobs/${current}`, { method: "DELETE", headers: headers() });
});
