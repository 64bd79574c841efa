// pneumoscan page: upload -> /api/predict -> bars and verdict; overlay from /api/explain.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const LABELS = ["normal", "bacterial", "viral"];
  let current = null;       // the chosen File
  let overlayFor = null;    // the File the overlay image belongs to
  let explainOk = false;

  function setStatus(text, isError) {
    $("status").textContent = text;
    $("status").classList.toggle("error", !!isError);
  }

  async function errorText(resp) {
    try { const j = await resp.json(); return j.detail ? (typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail)) : resp.statusText; }
    catch (e) { return resp.status + " " + resp.statusText; }
  }

  async function loadInfo() {
    for (let i = 0; i < 120; i++) {
      try {
        const r = await fetch("/api/info");
        const info = await r.json();
        explainOk = !!info.explain;
        if (info.ready) {
          setStatus("Model " + info.model + " ready; pneumonia threshold " + info.threshold.toFixed(3) + ". Choose an image.");
          return;
        }
      } catch (e) { /* server starting */ }
      setStatus("Loading model…");
      await new Promise((res) => setTimeout(res, 1000));
    }
  }

  function showPreview(file) {
    const img = $("preview");
    const isDicom = /\.dcm$/i.test(file.name) || file.type === "application/dicom";
    $("overlay").hidden = true;
    if (img.src) URL.revokeObjectURL(img.src);
    if (isDicom) { img.hidden = true; img.removeAttribute("src"); $("no-preview").hidden = false; return; }
    $("no-preview").hidden = true;
    img.src = URL.createObjectURL(file);
    img.hidden = false;
  }

  function showResult(r) {
    $("result").hidden = false;
    const v = $("verdict");
    v.textContent = r.pneumonia ? "Pneumonia" : "No pneumonia";
    v.className = "verdict " + (r.pneumonia ? "pos" : "neg");
    v.dataset.pneumonia = String(r.pneumonia);
    $("verdict-detail").textContent = "Most likely class: " + r.label + ". P(pneumonia) = " +
      r.pneumonia_probability.toFixed(3) + " vs threshold " + r.threshold.toFixed(3) + ".";
    for (const lab of LABELS) {
      const p = r.probabilities[lab];
      const row = document.querySelector('.bar[data-label="' + lab + '"]');
      row.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
      row.classList.toggle("top", lab === r.label);
      row.dataset.p = String(p);
      $("p-" + lab).textContent = (100 * p).toFixed(1) + "%";
    }
    const w = $("warnings");
    w.replaceChildren();
    for (const text of r.warnings || []) { const li = document.createElement("li"); li.textContent = text; w.appendChild(li); }
    $("meta").textContent = "model " + r.model + " · " + r.elapsed_ms.toFixed(0) + " ms";
  }

  async function predict(file) {
    current = file;
    overlayFor = null;
    showPreview(file);
    $("result").hidden = true;
    $("overlay-toggle").disabled = true;
    setStatus("Analysing " + file.name + "…");
    const fd = new FormData();
    fd.append("file", file, file.name);
    let resp;
    try { resp = await fetch("/api/predict", { method: "POST", body: fd }); }
    catch (e) { setStatus("Network error: " + e, true); return; }
    if (file !== current) return;
    if (!resp.ok) { setStatus("Error " + resp.status + ": " + await errorText(resp), true); return; }
    showResult(await resp.json());
    setStatus("Done: " + file.name);
    $("overlay-toggle").disabled = false;
    if ($("overlay-toggle").checked) await showOverlay();
  }

  async function showOverlay() {
    const ov = $("overlay");
    if (!current) return;
    if (!explainOk) { $("overlay-status").textContent = "Explanations are not available on this server."; return; }
    if (overlayFor === current) { setOverlay(true); return; }
    $("overlay-status").textContent = "Computing the explanation…";
    const fd = new FormData();
    fd.append("file", current, current.name);
    const file = current;
    const resp = await fetch("/api/explain", { method: "POST", body: fd });
    if (file !== current) return;
    if (!resp.ok) { $("overlay-status").textContent = "Overlay unavailable: " + await errorText(resp); return; }
    if (ov.src) URL.revokeObjectURL(ov.src);
    ov.src = URL.createObjectURL(await resp.blob());
    overlayFor = file;
    setOverlay($("overlay-toggle").checked);
    $("overlay-status").textContent = "Overlay: regions that drove the predicted class (Grad-CAM).";
  }

  // The overlay PNG is a figure of its own (image + heat map + colour bar): shown instead of the preview.
  function setOverlay(on) {
    const isDicom = !$("no-preview").hidden || !$("preview").src;
    $("overlay").hidden = !on;
    $("preview").hidden = on || isDicom;
  }

  function init() {
    const input = $("file"), drop = $("drop");
    input.addEventListener("change", () => { if (input.files.length) predict(input.files[0]); });
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
    for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
    for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
    drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) predict(e.dataTransfer.files[0]); });
    $("overlay-toggle").addEventListener("change", (e) => {
      if (e.target.checked) showOverlay(); else { setOverlay(false); $("overlay-status").textContent = ""; }
    });
    loadInfo();
  }
  document.addEventListener("DOMContentLoaded", init);
})();
