// The review page's only script (served by the app; the Content-Security-Policy allows no other).
"use strict";

// Caps the server enforces, checked before sending so that the reader gets a sentence, not a refused request.
function uploadProblem(form, files) {
  const maxFiles = Number(form.dataset.maxFiles || 0);
  const maxBytes = Number(form.dataset.maxBytes || 0);
  if (maxFiles && files.length > maxFiles) {
    return `Too many files at once: ${files.length} were chosen, the page takes at most ${maxFiles} per upload. ` +
      "Upload them in smaller groups.";
  }
  const total = Array.from(files).reduce((sum, f) => sum + f.size, 0);
  if (maxBytes && total > maxBytes) {
    return `These files are too large together (${(total / 2 ** 20).toFixed(1)} MB; the limit is ` +
      `${(maxBytes / 2 ** 20).toFixed(0)} MB). Upload fewer at a time.`;
  }
  return null;
}

function setUpUpload() {
  const form = document.getElementById("upload-form");
  const input = document.getElementById("files");
  const zone = document.getElementById("drop-zone");
  const problem = document.getElementById("upload-problem");
  if (!form || !input || !zone) return;
  const send = (files) => {
    const said = uploadProblem(form, files);
    if (problem) {
      problem.textContent = said || "";
      problem.hidden = !said;
    }
    if (!said) form.submit();
  };
  input.addEventListener("change", () => { if (input.files.length) send(input.files); });
  ["dragenter", "dragover"].forEach((kind) => zone.addEventListener(kind, (event) => {
    event.preventDefault();
    zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((kind) => zone.addEventListener(kind, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (!event.dataTransfer || !event.dataTransfer.files.length) return;
    input.files = event.dataTransfer.files;
    send(input.files);
  });
}

function setUpHeatMap() {
  const heat = document.getElementById("heatmap");
  const toggle = document.getElementById("heat-toggle");
  const opacity = document.getElementById("heat-opacity");
  if (!heat || !toggle || !opacity) return;
  const apply = () => {
    heat.style.opacity = String(Number(opacity.value) / 100);
    heat.hidden = !toggle.checked;
  };
  toggle.addEventListener("change", apply);
  opacity.addEventListener("input", apply);
  apply();
  heat.addEventListener("load", () => describeHeatMap(heat.dataset.facts));
  if (heat.complete && heat.naturalWidth) describeHeatMap(heat.dataset.facts);
}

// What the heat map can and cannot say: the resolution of the feature map it comes from, and whether it differs
// from the maps of other images at all.
function describeHeatMap(url) {
  const caption = document.getElementById("heat-facts");
  if (!caption || !url) return;
  fetch(url, {credentials: "same-origin"}).then((r) => (r.ok ? r.json() : null)).then((facts) => {
    if (!facts) return;
    const [rows, cols] = facts.grid;
    let text = `Drawn from the network's last feature map: ${rows}×${cols} cells for a ${facts.input} px input, ` +
      `each cell about ${Math.round(facts.input / cols)} px wide, smoothed to the slice. `;
    text += rows * cols <= 16
      ? "That is too coarse to localise a lesion: it marks which part of the image drove the class."
      : "It marks regions that drove the class, not a lesion's outline.";
    if (facts.barely_differs) {
      text += ` This map barely differs from the other ${facts.compared} maps this model version drew ` +
        `(mean difference ${(facts.mean_difference * 100).toFixed(1)}%): it says little about this image.`;
    }
    caption.textContent = text;
    caption.classList.toggle("warn", Boolean(facts.barely_differs));
  }).catch(() => {});
}

// Keys go to the verdict unless the reviewer is typing; the heat map's toggle and slider keep them working.
function typing(target) {
  if (!target) return false;
  if (target.tagName === "TEXTAREA" || target.tagName === "SELECT" || target.isContentEditable) return true;
  return target.tagName === "INPUT" && !["checkbox", "range", "radio", "button", "submit"].includes(target.type);
}

function setUpKeys() {
  const form = document.getElementById("verdict-form");
  const undo = document.getElementById("undo");
  const skip = document.getElementById("skip");
  const previous = document.getElementById("previous");
  if (!form && !undo) return;
  const agree = document.getElementById("agree");
  const hint = document.getElementById("key-hint");
  const hintText = hint ? hint.innerHTML : "";
  let choosing = false;
  let sent = false;
  const send = (button) => {
    if (sent) return;
    sent = true;
    form.requestSubmit(button);
  };
  const stopChoosing = () => {
    choosing = false;
    form.classList.remove("choosing");
    hint.innerHTML = hintText;
  };
  document.addEventListener("keydown", (event) => {
    if (sent || event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event.target)) return;
    const key = event.key.toLowerCase();
    if (form && choosing && /^[1-9]$/.test(key)) {
      event.preventDefault();
      const choice = form.querySelector(`button.choice[data-key="${key}"]`);
      if (choice) send(choice);  // the predicted class's own number too: that is agreement
      else hint.textContent = `No choice has the number ${key}: press one of those shown, or Esc.`;
      return;
    }
    if (key === "u" && undo && !undo.disabled) {
      event.preventDefault();
      sent = true;
      undo.form.requestSubmit(undo);
    } else if (key === "s" && skip) {
      event.preventDefault();
      sent = true;
      skip.click();
    } else if (key === "p" && previous) {
      event.preventDefault();
      sent = true;
      goBack(previous);
    } else if (!form) {
      return;
    } else if (key === "a") {
      event.preventDefault();
      send(agree);
    } else if (key === "d") {
      event.preventDefault();
      choosing = true;
      form.classList.add("choosing");
      hint.textContent = "Press the number of what you see (Esc cancels).";
    } else if (key === "escape" && choosing) {
      stopChoosing();
    }
  });
}

// The cases this tab has shown, so that "previous" goes back to the case read before (the worklist's order when
// the tab has none).
const TRAIL = "review-trail";

function trail() {
  try {
    return JSON.parse(sessionStorage.getItem(TRAIL) || "[]");
  } catch (e) {
    return [];
  }
}

function rememberCase() {
  if (!document.getElementById("verdict-form")) return;
  const here = location.pathname + location.search.replace(/[?&]saved=\d+/, "").replace(/^&/, "?");
  const seen = trail();
  if (seen[seen.length - 1] !== here) seen.push(here);
  sessionStorage.setItem(TRAIL, JSON.stringify(seen.slice(-50)));
}

function goBack(fallback) {
  const seen = trail();
  seen.pop();  // this case
  const before = seen.pop();
  sessionStorage.setItem(TRAIL, JSON.stringify(seen));
  if (before) location.assign(before);
  else fallback.click();
}

// The verdict just saved can be undone for a few seconds (the server refuses it later as well).
function setUpUndo() {
  const box = document.getElementById("saved");
  const undo = document.getElementById("undo");
  const left = document.getElementById("undo-left");
  if (!box || !undo) return;
  const until = Date.now() + Number(box.dataset.seconds || 0) * 1000;
  const tick = () => {
    const seconds = Math.ceil((until - Date.now()) / 1000);
    if (seconds <= 0) {
      undo.disabled = true;
      left.textContent = "";
      box.classList.add("settled");
      return;
    }
    left.textContent = `${seconds} s`;
    setTimeout(tick, 250);
  };
  tick();
}

// ---- the series viewer: one slice at a time on a canvas, windowed here from the stored values ----------------

const PRESETS = {brain: [0.02, 0.98], contrast: [0.40, 0.995]};  // percentiles of the slice on screen

function percentile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))))];
}

class Viewer {
  constructor(box, data) {
    this.box = box;
    this.data = data;
    this.slices = data.slices;
    this.index = Math.max(0, this.slices.findIndex((s) => s.prediction_id === box.dataset.current));
    this.cache = new Map();
    this.flagged = new Set();
    this.stage = document.getElementById("stage");
    this.canvas = document.getElementById("view");
    this.picture = document.getElementById("slice");
    this.heat = document.getElementById("heatmap");
    this.form = document.getElementById("verdict-form");
    this.zoom = 1;
    this.pan = [0, 0];
    this.wl = null;  // [width, level] for the whole series, as a reader sets it once
  }

  load(i) {
    const slice = this.slices[i];
    if (!this.cache.has(i)) {
      this.cache.set(i, fetch(slice.pixels, {credentials: "same-origin"}).then((r) => {
        if (!r.ok) throw new Error("slice not available");
        const [low, high] = r.headers.get("X-Window").split(" ").map(Number);
        const [min, max] = r.headers.get("X-Range").split(" ").map(Number);
        return r.arrayBuffer().then((buf) => ({
          values: new Float32Array(buf), width: Number(r.headers.get("X-Width")),
          height: Number(r.headers.get("X-Height")), window: [low, high], range: [min, max],
          inverted: r.headers.get("X-Inverted") === "1",
        }));
      }));
    }
    return this.cache.get(i);
  }

  start() {
    for (const id of ["viewer-bar", "strip", "viewer-hint", "slice-reading"]) document.getElementById(id).hidden = false;
    this.box.classList.add("live");
    this.canvas.hidden = false;
    this.picture.hidden = true;
    this.drawStrip();
    this.showStudy();
    this.showSeries();
    this.bind();
    // the key slices' heat maps are drawn now, so that they show without delay
    this.slices.filter((s) => s.key).forEach((s) => { new Image().src = s.heatmap; });
    if (this.form && this.slices.length > 1) {
      const series = document.createElement("input");
      Object.assign(series, {type: "hidden", name: "series", value: "1"});
      this.form.appendChild(series);
    }
    this.show(this.index, true);
  }

  show(i, fit) {
    this.index = Math.max(0, Math.min(this.slices.length - 1, i));
    const slice = this.slices[this.index];
    const wanted = this.index;
    this.heat.src = slice.heatmap;
    this.heat.dataset.facts = slice.heatmap.replace(/\.png$/, ".json");
    this.picture.src = slice.pixels.replace("/pixels", "/slice.png");
    this.box.dataset.index = String(this.index);
    this.load(this.index).then((px) => {
      if (wanted !== this.index) return;
      this.px = px;
      if (!this.wl) this.wl = this.fileWindow();
      if (this.canvas.width !== px.width || this.canvas.height !== px.height) {
        this.canvas.width = px.width;
        this.canvas.height = px.height;
        this.stage.style.width = `${px.width}px`;
        this.stage.style.height = `${px.height}px`;
        fit = true;
      }
      if (fit) this.fit();
      this.draw();
    }).catch(() => { this.say("slice-counter", `slice ${this.index + 1}: could not be loaded`); });
    [this.index - 1, this.index + 1].filter((k) => k >= 0 && k < this.slices.length).forEach((k) => this.load(k));
    this.say("slice-counter", `Slice ${this.index + 1} / ${this.slices.length}`);
    const reasons = slice.refer ? ` · refer: ${slice.reasons.join("; ")}` : "";
    this.say("slice-reading", `This slice: ${slice.predicted_class} ${(slice.confidence * 100).toFixed(1)}%` +
      `${slice.key ? " · key slice" : ""}${reasons}`);
    document.getElementById("flag-slice").setAttribute("aria-pressed", String(this.flagged.has(slice.prediction_id)));
    this.markStrip();
  }

  say(id, text) {
    document.getElementById(id).textContent = text;
  }

  fileWindow() {
    const [low, high] = this.px.window;
    return [Math.max(high - low, 1e-6), (low + high) / 2];
  }

  preset(name) {
    if (!this.px) return;
    if (name === "file") {
      this.wl = this.fileWindow();
    } else if (name === "full") {
      const [min, max] = this.px.range;
      this.wl = [Math.max(max - min, 1e-6), (min + max) / 2];
    } else {
      const step = Math.max(1, Math.floor(this.px.values.length / 20000));
      const sample = [];
      for (let k = 0; k < this.px.values.length; k += step) sample.push(this.px.values[k]);
      sample.sort((a, b) => a - b);
      const [low, high] = PRESETS[name].map((q) => percentile(sample, q));
      this.wl = [Math.max(high - low, 1e-6), (low + high) / 2];
    }
    this.draw();
  }

  draw() {
    const px = this.px;
    if (!px) return;
    const [width, level] = this.wl;
    const low = level - width / 2;
    const ctx = this.canvas.getContext("2d");
    const image = ctx.createImageData(px.width, px.height);
    const out = image.data;
    for (let k = 0; k < px.values.length; k += 1) {
      let v = ((px.values[k] - low) / width) * 255;
      v = v < 0 ? 0 : v > 255 ? 255 : v;
      if (px.inverted) v = 255 - v;
      const o = k * 4;
      out[o] = v;
      out[o + 1] = v;
      out[o + 2] = v;
      out[o + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    this.say("wl", `W ${Math.round(width)} L ${Math.round(level)}`);
    this.box.dataset.drawn = String(this.index);  // the slice on the canvas (the counter may run ahead of it)
  }

  place() {
    this.stage.style.transform = `translate(${this.pan[0]}px, ${this.pan[1]}px) scale(${this.zoom})`;
    this.say("zoom", `${Math.round(this.zoom * 100)}%`);
  }

  fit() {
    if (!this.px) return;
    const {clientWidth: w, clientHeight: h} = this.box;
    this.zoom = Math.min(w / this.px.width, h / this.px.height);
    this.pan = [(w - this.px.width * this.zoom) / 2, (h - this.px.height * this.zoom) / 2];
    this.place();
  }

  zoomBy(factor, at) {
    const [x, y] = at || [this.box.clientWidth / 2, this.box.clientHeight / 2];
    const next = Math.min(16, Math.max(0.1, this.zoom * factor));
    this.pan = [x - ((x - this.pan[0]) * next) / this.zoom, y - ((y - this.pan[1]) * next) / this.zoom];
    this.zoom = next;
    this.place();
  }

  nextKey() {
    const keys = this.slices.filter((s) => s.key).map((s) => s.index);
    if (!keys.length) return;
    this.show(keys.find((k) => k > this.index) ?? keys[0]);
  }

  toggleFlag() {
    const slice = this.slices[this.index];
    if (this.flagged.has(slice.prediction_id)) this.flagged.delete(slice.prediction_id);
    else this.flagged.add(slice.prediction_id);
    if (this.form) {
      this.form.querySelectorAll("input[name=flagged]").forEach((e) => e.remove());
      this.flagged.forEach((id) => {
        const input = document.createElement("input");
        Object.assign(input, {type: "hidden", name: "flagged", value: id});
        this.form.appendChild(input);
      });
    }
    this.show(this.index);
  }

  drawStrip() {
    const strip = document.getElementById("strip");
    this.cells = this.slices.map((s) => {
      const cell = document.createElement("button");
      cell.type = "button";
      cell.className = `cell${s.key ? " key" : ""}${s.refer ? " refer" : ""}`;
      cell.title = `slice ${s.index + 1}: ${s.predicted_class}${s.key ? ", key slice" : ""}${s.refer ? ", referred" : ""}`;
      cell.addEventListener("click", () => this.show(s.index));
      strip.appendChild(cell);
      return cell;
    });
  }

  markStrip() {
    this.cells.forEach((cell, k) => {
      cell.classList.toggle("current", k === this.index);
      cell.classList.toggle("flagged", this.flagged.has(this.slices[k].prediction_id));
    });
  }

  showStudy() {
    const s = this.data.study || {};
    const parts = [s.PatientID && `Patient ${s.PatientID}`, s.PatientName, s.AccessionNumber && `Acc. ${s.AccessionNumber}`,
      s.StudyDate, s.Modality, s.StudyDescription, s.SeriesDescription && `Series: ${s.SeriesDescription}`];
    const line = document.getElementById("study-line");
    line.textContent = parts.filter(Boolean).join(" · ");  // text, never markup: these fields come from the sender
    line.hidden = !line.textContent;
  }

  showSeries() {
    const series = this.data.series;
    if (this.slices.length < 2) return;
    document.getElementById("series-reading").hidden = false;
    const banner = document.getElementById("series-banner");
    banner.textContent = series.refer
      ? `Series of ${series.n} slices: refer (its leading class was ${series.predicted_class})`
      : `Series of ${series.n} slices: ${series.predicted_class} ` +
        `${(series.probabilities[series.predicted_class] * 100).toFixed(1)}%`;
    banner.classList.toggle("refer", series.refer);
    this.judgeSeries(series);
    this.say("series-rule", series.rule);
    const bars = document.getElementById("series-bars");
    Object.entries(series.probabilities).forEach(([name, p]) => {
      const li = document.createElement("li");
      const label = document.createElement("span");
      label.className = "cls";
      label.textContent = name;
      const bar = document.createElement("progress");
      bar.max = 1;
      bar.value = p;
      const value = document.createElement("span");
      value.className = "p";
      value.textContent = `${(p * 100).toFixed(1)}%`;
      li.append(document.createElement("span"), label, bar, value);
      bars.appendChild(li);
    });
    const reasons = document.getElementById("series-reasons");
    series.reasons.forEach((r) => {
      const li = document.createElement("li");
      li.textContent = r;
      reasons.appendChild(li);
    });
  }

  // A verdict here judges the series: A agrees with the series' class, or confirms the series' referral.
  judgeSeries(series) {
    const agree = document.getElementById("agree");
    if (!agree || !this.form) return;
    agree.value = series.refer ? "refer" : "agree";
    agree.textContent = "";
    const key = document.createElement("kbd");
    key.textContent = "A";
    agree.append(key, series.refer ? " Confirm the series' referral (no class)"
      : ` Agree: the series is ${series.predicted_class}`);
    this.form.dataset.referred = series.refer ? "1" : "0";
    this.form.querySelectorAll("button.choice").forEach((b) => {
      b.classList.toggle("predicted", b.value === `class:${series.predicted_class}`);
    });
  }

  bind() {
    const box = this.box;
    box.addEventListener("wheel", (event) => {
      event.preventDefault();
      if (event.ctrlKey) {
        const rect = box.getBoundingClientRect();
        this.zoomBy(event.deltaY < 0 ? 1.25 : 0.8, [event.clientX - rect.left, event.clientY - rect.top]);
      } else {
        this.show(this.index + (event.deltaY > 0 ? 1 : -1));
      }
    }, {passive: false});
    box.addEventListener("contextmenu", (event) => event.preventDefault());
    box.addEventListener("pointerdown", (event) => {
      const start = [event.clientX, event.clientY];
      const from = {wl: this.wl && [...this.wl], pan: [...this.pan]};
      const windowing = event.button === 2;
      box.setPointerCapture(event.pointerId);
      const move = (e) => {
        const dx = e.clientX - start[0];
        const dy = e.clientY - start[1];
        if (windowing && this.px && from.wl) {
          const scale = (this.px.range[1] - this.px.range[0] || 1) / 256;  // one screen pixel: 1/256 of the range
          this.wl = [Math.max(from.wl[0] + dx * scale, 1e-6), from.wl[1] + dy * scale];
          this.draw();
        } else if (!windowing) {
          this.pan = [from.pan[0] + dx, from.pan[1] + dy];
          this.place();
        }
      };
      const up = () => {
        box.removeEventListener("pointermove", move);
        box.removeEventListener("pointerup", up);
      };
      box.addEventListener("pointermove", move);
      box.addEventListener("pointerup", up);
    });
    const preset = document.getElementById("wl-preset");
    preset.addEventListener("change", () => this.preset(preset.value));
    document.getElementById("wl-reset").addEventListener("click", () => { preset.value = "file"; this.preset("file"); });
    document.getElementById("fit").addEventListener("click", () => this.fit());
    document.getElementById("next-key").addEventListener("click", () => this.nextKey());
    document.getElementById("flag-slice").addEventListener("click", () => this.toggleFlag());
    window.addEventListener("resize", () => this.fit());
    document.addEventListener("keydown", (event) => {
      if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
      const key = event.key.toLowerCase();
      const actions = {
        arrowdown: () => this.show(this.index + 1), j: () => this.show(this.index + 1),
        arrowup: () => this.show(this.index - 1), k: () => this.show(this.index - 1),
        "+": () => this.zoomBy(1.25), "=": () => this.zoomBy(1.25), "-": () => this.zoomBy(0.8),
        0: () => this.fit(), r: () => { preset.value = "file"; this.preset("file"); },
        n: () => this.nextKey(), f: () => this.toggleFlag(),
      };
      if (actions[key] && !(this.form && this.form.classList.contains("choosing") && /^[0-9]$/.test(key))) {
        event.preventDefault();
        actions[key]();
      }
    });
  }
}

function setUpViewer() {
  const box = document.getElementById("viewer");
  if (!box || !box.dataset.series) return;
  fetch(box.dataset.series, {credentials: "same-origin"}).then((r) => (r.ok ? r.json() : null)).then((data) => {
    if (data && data.slices.length) {
      window.reviewViewer = new Viewer(box, data);
      window.reviewViewer.start();
    }
  }).catch(() => {});
}

document.addEventListener("DOMContentLoaded", () => {
  setUpUpload();
  setUpHeatMap();
  setUpViewer();
  rememberCase();
  setUpKeys();
  setUpUndo();
});
