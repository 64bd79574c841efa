// pneumoscan page: upload -> /api/predict?preview=true -> verdict, scale, bars and the decoded image;
// the explanation is /api/explain?layer=true, a transparent heat map laid over that image.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const LABELS = ["normal", "bacterial", "viral"];
  let info = null;          // /api/info
  let current = null;       // the chosen File
  let overlayFor = null;    // the File the heat-map layer belongs to
  let lastLabel = "";

  function setStatus(text) { $("status").textContent = text; }

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = false;
  }

  async function problemText(resp) {  // RFC 9457 problem details: "detail" is one line for a person
    try { const j = await resp.json(); return j.detail || resp.statusText; }
    catch (e) { return resp.status + " " + resp.statusText; }
  }

  async function loadInfo() {
    for (let i = 0; i < 600; i++) {
      try {
        info = await (await fetch("/api/info")).json();
        $("max-mb").textContent = String(Math.round(info.max_upload_bytes / 1048576));
        if (info.ready) {
          setStatus("Model " + info.model + " · threshold " + info.threshold.toFixed(3));
          $("card-open").hidden = !info.card;
          return;
        }
      } catch (e) { /* server starting */ }
      setStatus("Loading model…");
      await new Promise((res) => setTimeout(res, 1000));
    }
  }

  function certainty(p, t) {  // how far the score is from the decision threshold
    const d = Math.abs(p - t);
    if (d < 0.1) return ["borderline", "warn"];
    if (d < 0.25) return ["moderate", "mid"];
    return ["clear", "ok"];
  }

  function showScope(r) {  // out of scope: no diagnosis, the reasons instead
    const v = $("verdict");
    v.textContent = "Not a chest X-ray this model can read";
    v.className = "verdict scope";
    v.dataset.pneumonia = "";
    $("certainty").textContent = "no diagnosis";
    $("certainty").className = "badge warn";
    const ul = $("reasons");
    ul.replaceChildren();
    for (const text of r.reasons) { const li = document.createElement("li"); li.textContent = text; ul.appendChild(li); }
    ul.hidden = false;
    $("answer").hidden = true;
  }

  function showResult(r, file) {
    $("reasons").hidden = true;
    $("answer").hidden = false;
    if (!r.in_scope) showScope(r); else showAnswer(r);
    finishResult(r, file);
  }

  function showAnswer(r) {
    const v = $("verdict");
    const refer = r.verdict !== r.label;  // "uncertain: refer": the prediction set holds normal and pneumonia
    v.textContent = refer ? "Uncertain: refer" : (r.pneumonia ? "Pneumonia" : "No pneumonia");
    v.className = "verdict " + (refer ? "refer" : (r.pneumonia ? "pos" : "neg"));
    v.dataset.pneumonia = String(r.pneumonia);
    const [word, kind] = refer ? ["uncertain", "warn"] : certainty(r.pneumonia_probability, r.threshold);
    $("certainty").textContent = word;
    $("certainty").className = "badge " + kind;
    const pct = (x) => (100 * x).toFixed(1) + "%";
    $("scale-fill").style.width = pct(r.pneumonia_probability);
    $("scale-fill").className = "scale-fill " + (r.pneumonia ? "pos" : "neg");
    $("scale-mark").style.left = pct(r.pneumonia_probability);
    $("scale-threshold").style.left = pct(r.threshold);
    $("scale-threshold-label").textContent = "threshold " + r.threshold.toFixed(2);
    $("scale-threshold-label").style.left = pct(r.threshold);
    $("verdict-detail").textContent = "P(pneumonia) = " + r.pneumonia_probability.toFixed(3) + " against the threshold " +
      r.threshold.toFixed(3) + "; most likely class: " + r.label + ".";
    for (const lab of LABELS) {
      const p = r.probabilities[lab];
      const row = document.querySelector('.bar[data-label="' + lab + '"]');
      row.querySelector(".fill").style.width = pct(p);
      row.classList.toggle("top", lab === r.label);
      row.dataset.p = String(p);
      $("p-" + lab).textContent = pct(p);
    }
    const ps = $("pset");
    ps.hidden = !r.prediction_set;
    if (r.prediction_set) {
      const cover = info && info.conformal_alpha ? Math.round(100 * (1 - info.conformal_alpha)) + " %" : "";
      ps.textContent = "Prediction set: {" + r.prediction_set.join(", ") + "}" + (cover ? " (holds the true class for " +
        cover + " of X-rays like the validation images)" : "") + (r.ood_score != null ? " · out-of-distribution score " +
        r.ood_score.toFixed(1) : "");
    }
  }

  function finishResult(r, file) {
    const w = $("warnings");
    w.replaceChildren();
    for (const text of r.warnings || []) { const li = document.createElement("li"); li.textContent = text; w.appendChild(li); }
    $("meta").textContent = "model " + r.model + " · " + r.elapsed_ms.toFixed(0) + " ms";
    $("result").hidden = false;
    lastLabel = r.label;
    const im = r.image;
    $("caption").textContent = file.name + " · " + im.format.toUpperCase() + " " + im.width + " × " + im.height +
      " · shown as the model decoded it";
    $("preview").src = r.preview;
    $("viewer-col").hidden = false;
    $("main").classList.remove("empty");
  }

  function reset() {
    $("error").hidden = true;
    $("result").hidden = true;
    $("viewer-col").hidden = true;
    $("overlay").hidden = true;
    $("legend").hidden = true;
    $("opacity-label").hidden = true;
    $("overlay-status").textContent = "";
    $("overlay-toggle").disabled = true;
    $("preview").removeAttribute("src");
    if ($("overlay").src) { URL.revokeObjectURL($("overlay").src); $("overlay").removeAttribute("src"); }
  }

  async function predict(file) {
    current = file;
    overlayFor = null;
    reset();
    if (info && file.size > info.max_upload_bytes) {  // refused here: no 20 MiB upload to learn it
      showError(file.name + ": " + (file.size / 1048576).toFixed(1) + " MiB is over the limit of " +
        Math.round(info.max_upload_bytes / 1048576) + " MiB; send a smaller image.");
      $("main").classList.add("empty");
      return;
    }
    $("drop-text").textContent = "Analysing " + file.name + "…";
    const fd = new FormData();
    fd.append("file", file, file.name);
    let resp;
    try { resp = await fetch("/api/predict?preview=true", { method: "POST", body: fd }); }
    catch (e) { showError("Network error: " + e); resetDrop(); return; }
    if (file !== current) return;
    resetDrop();
    if (!resp.ok) { showError("Error " + resp.status + ": " + await problemText(resp)); $("main").classList.add("empty"); return; }
    const r = await resp.json();
    showResult(r, file);
    $("overlay-toggle").disabled = !r.in_scope;  // no diagnosis, nothing to explain
    if (r.in_scope && $("overlay-toggle").checked) await showOverlay();
  }

  function resetDrop() { $("drop-text").textContent = "Drop another X-ray here, or click to choose"; }

  async function showOverlay() {
    if (!current) return;
    if (!info || !info.explain) {
      try { info = await (await fetch("/api/info")).json(); } catch (e) { /* keep the old info */ }
    }
    if (!info.explain) {
      $("overlay-status").textContent = info.explain_status === "preparing" ?
        "Explanations are being prepared on the server (a one-time export); try again in a minute." :
        "Explanations are not available on this server" + (info.explain_error ? ": " + info.explain_error : ".");
      return;
    }
    if (overlayFor === current) { setOverlay(true); return; }
    $("overlay-status").textContent = "Computing the explanation…";
    const fd = new FormData();
    fd.append("file", current, current.name);
    const file = current;
    let resp;
    try { resp = await fetch("/api/explain?layer=true", { method: "POST", body: fd }); }
    catch (e) { $("overlay-status").textContent = "Network error: " + e; return; }
    if (file !== current) return;
    if (!resp.ok) { $("overlay-status").textContent = "Explanation unavailable: " + await problemText(resp); return; }
    const ov = $("overlay");
    if (ov.src) URL.revokeObjectURL(ov.src);
    ov.src = URL.createObjectURL(await resp.blob());
    overlayFor = file;
    setOverlay($("overlay-toggle").checked);
  }

  function setOverlay(on) {
    $("overlay").hidden = !on;
    $("legend").hidden = !on;
    $("opacity-label").hidden = !on;
    $("legend-text").textContent = "evidence for “" + lastLabel + "” (Grad-CAM, relative to its maximum)";
    $("overlay-status").textContent = on ? "Warm colours: regions that raised the predicted class. " +
      "A map is a hint about the model, not a finding." : "";
  }

  async function openCard() {
    const d = $("card");
    d.showModal();
    try {
      const r = await fetch("/api/card");
      $("card-text").textContent = r.ok ? await r.text() : await problemText(r);
    } catch (e) { $("card-text").textContent = "Network error: " + e; }
  }

  function init() {
    const input = $("file"), drop = $("drop");
    input.addEventListener("change", () => { if (input.files.length) predict(input.files[0]); input.value = ""; });
    drop.addEventListener("click", () => input.click());
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
    for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
    for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
    drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) predict(e.dataTransfer.files[0]); });
    $("overlay-toggle").addEventListener("change", (e) => { if (e.target.checked) showOverlay(); else setOverlay(false); });
    $("opacity").addEventListener("input", (e) => { $("overlay").style.opacity = String(e.target.value / 100); });
    $("overlay").style.opacity = "0.6";
    $("card-open").addEventListener("click", openCard);
    loadInfo();
  }
  document.addEventListener("DOMContentLoaded", init);
})();
