// The review page's only script (served by the app; the Content-Security-Policy allows no other).
"use strict";

function setUpUpload() {
  const form = document.getElementById("upload-form");
  const input = document.getElementById("files");
  const zone = document.getElementById("drop-zone");
  if (!form || !input || !zone) return;
  input.addEventListener("change", () => { if (input.files.length) form.submit(); });
  ["dragenter", "dragover"].forEach((kind) => zone.addEventListener(kind, (event) => {
    event.preventDefault();
    zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((kind) => zone.addEventListener(kind, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (!event.dataTransfer || !event.dataTransfer.files.length) return;
    input.files = event.dataTransfer.files;
    form.submit();
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
}

// Keys go to the verdict unless the reviewer is typing; the heat map's toggle and slider keep them working.
function typing(target) {
  if (!target) return false;
  if (target.tagName === "TEXTAREA" || target.tagName === "SELECT" || target.isContentEditable) return true;
  return target.tagName === "INPUT" && !["checkbox", "range", "radio", "button", "submit"].includes(target.type);
}

function setUpKeys() {
  const form = document.getElementById("verdict-form");
  if (!form) return;
  const agree = document.getElementById("agree");
  const disagree = document.getElementById("disagree");
  const select = document.getElementById("reviewer-class");
  const hint = document.getElementById("key-hint");
  let choosing = false;
  let sent = false;
  const send = (button) => {
    if (sent) return;
    sent = true;
    form.requestSubmit(button);
  };
  document.addEventListener("keydown", (event) => {
    if (sent || event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event.target)) return;
    const key = event.key.toLowerCase();
    if (choosing && /^[1-9]$/.test(key)) {
      const option = select.querySelector(`option[data-key="${key}"]`);
      if (option) {
        event.preventDefault();
        select.value = option.value;
        send(disagree);
      }
      return;
    }
    if (key === "a") {
      event.preventDefault();
      send(agree);
    } else if (key === "d") {
      event.preventDefault();
      choosing = true;
      form.classList.add("choosing");
      hint.textContent = "Disagree: press the number of the correct class (Esc cancels).";
    } else if (key === "escape" && choosing) {
      choosing = false;
      form.classList.remove("choosing");
      hint.textContent = "Keys: A agree · D then a number: the correct class.";
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpUpload();
  setUpHeatMap();
  setUpKeys();
});
