// The page of `latentdiff serve`: a form that posts to the A1111 API this server speaks (/sdapi/v1/txt2img or
// img2img), a progress bar from /sdapi/v1/progress, and a gallery of the PNGs it answers (each carrying its
// parameters, downloadable as it is).
"use strict";

const $ = (id) => document.getElementById(id);
let lastSeed = null;
let initImage = null; // {dataUrl, width, height} of the image to start from

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(data.message || `${response.status} ${response.statusText}`);
  }
  return data;
}

async function setUp() {
  const model = await api("/latentdiff/v1/model");
  $("model").textContent = model.title;
  for (const name of ["width", "height"]) {
    $(name).value = model[name];
    $(name).step = model.multiple_of;
  }
  const own = model.few_step_max_steps
    ? `default (${model.own_sampler}; LCM ≤ ${model.few_step_max_steps} steps)`
    : `default (${model.own_sampler})`;
  const select = $("sampler_name");
  select.add(new Option(own, ""));
  for (const sampler of await api("/sdapi/v1/samplers")) {
    select.add(new Option(sampler.name, sampler.name));
  }
}

function request() {
  const seed = Number($("seed").value);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    steps: Number($("steps").value), cfg_scale: Number($("cfg_scale").value), seed: seed,
    width: Number($("width").value), height: Number($("height").value), batch_size: Number($("batch_size").value),
    sampler_name: $("sampler_name").value || null, scheduler: $("scheduler").value || null,
    return_grid: false,
  };
  if (!initImage) {
    return ["/sdapi/v1/txt2img", body];
  }
  body.init_images = [initImage.dataUrl];
  body.denoising_strength = Number($("denoising_strength").value);
  const mask = maskDataUrl();
  if (mask) {
    body.mask = mask;
  }
  return ["/sdapi/v1/img2img", body];
}

async function generate(event) {
  event.preventDefault();
  const [path, body] = request();
  $("error").hidden = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").hidden = false;
  $("progress").value = 0;
  $("status").textContent = "waiting for the model…";
  const polling = setInterval(pollProgress, 300);
  const started = performance.now();
  try {
    const result = await api(path, body);
    const info = JSON.parse(result.info);
    lastSeed = info.seed;
    $("reuse_seed").disabled = false;
    show(result.images.slice(info.index_of_first_image), info);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $("status").textContent = `${info.all_seeds.length} image(s) in ${seconds} s` +
      (info.interrupted ? " (interrupted)" : "");
  } catch (error) {
    $("error").textContent = error.message;
    $("error").hidden = false;
    $("status").textContent = "";
  } finally {
    clearInterval(polling);
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("progress").hidden = true;
  }
}

async function pollProgress() {
  try {
    const progress = await api("/sdapi/v1/progress?skip_current_image=true");
    $("progress").value = progress.progress;
    if (progress.textinfo) {
      const eta = progress.eta_relative > 0.5 ? `, about ${progress.eta_relative.toFixed(0)} s left` : "";
      $("status").textContent = progress.textinfo + eta;
    }
  } catch (error) {
    // the next poll tries again; the generation's own answer reports real errors
  }
}

function show(images, info) {
  const gallery = $("gallery");
  images.map((b64, k) => [b64, k]).reverse().forEach(([b64, k]) => { // the newest first, in seed order
    const url = `data:image/png;base64,${b64}`;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = info.all_prompts[k];
    img.title = info.infotexts[k];
    const caption = document.createElement("figcaption");
    const seed = document.createElement("span");
    seed.textContent = `seed ${info.all_seeds[k]}`;
    const link = document.createElement("a");
    link.href = url;
    link.download = `latentdiff-${info.all_seeds[k]}.png`;
    link.textContent = "download PNG";
    caption.append(seed, link);
    figure.append(img, caption);
    gallery.prepend(figure);
  });
}

// img2img: the init image, and a mask painted over it --------------------------------------------------------------

function loadInitImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      initImage = {dataUrl: reader.result, width: img.naturalWidth, height: img.naturalHeight};
      for (const canvas of [$("init_canvas"), $("mask_canvas")]) {
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
      }
      $("init_canvas").getContext("2d").drawImage(img, 0, 0);
      clearMask();
      $("paint").hidden = false;
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

let painted = false;

function clearMask() {
  const canvas = $("mask_canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  painted = false;
}

function paintAt(event) {
  const canvas = $("mask_canvas");
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  const context = canvas.getContext("2d");
  context.fillStyle = "#ff2d55";
  context.beginPath();
  context.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale,
              Number($("brush").value) * scale / 2, 0, 2 * Math.PI);
  context.fill();
  painted = true;
}

function maskDataUrl() {
  if (!painted) {
    return null;
  }
  const source = $("mask_canvas");
  const mask = document.createElement("canvas");
  mask.width = source.width;
  mask.height = source.height;
  const context = mask.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, mask.width, mask.height);
  context.filter = "brightness(0) invert(1)"; // painted strokes → white
  context.drawImage(source, 0, 0);
  return mask.toDataURL("image/png");
}

function wire() {
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}));
  $("random_seed").addEventListener("click", () => { $("seed").value = -1; });
  $("reuse_seed").addEventListener("click", () => { if (lastSeed !== null) $("seed").value = lastSeed; });
  $("denoising_strength").addEventListener("input", (e) => { $("strength_value").textContent = e.target.value; });
  $("init_image").addEventListener("change", (e) => { if (e.target.files[0]) loadInitImage(e.target.files[0]); });
  $("clear_mask").addEventListener("click", clearMask);
  $("remove_init").addEventListener("click", () => {
    initImage = null;
    $("init_image").value = "";
    $("paint").hidden = true;
  });
  const canvas = $("mask_canvas");
  let down = false;
  canvas.addEventListener("pointerdown", (e) => { down = true; canvas.setPointerCapture(e.pointerId); paintAt(e); });
  canvas.addEventListener("pointermove", (e) => { if (down) paintAt(e); });
  canvas.addEventListener("pointerup", () => { down = false; });
}

wire();
setUp().catch((error) => {
  $("error").textContent = `could not reach the server: ${error.message}`;
  $("error").hidden = false;
});
