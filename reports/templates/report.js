// Sort and filter the sample cards of each task by a per-sample score (no network, no eval).
(function () {
  "use strict";
  function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }
  function setup(tools) {
    var grid = document.getElementById(tools.getAttribute("data-grid"));
    if (!grid) { return; }
    var cards = Array.prototype.slice.call(grid.querySelectorAll(".sample"));
    cards.forEach(function (c) {
      try { c.cm3Scores = JSON.parse(c.getAttribute("data-scores") || "{}"); } catch (e) { c.cm3Scores = {}; }
      c.cm3Index = Number(c.getAttribute("data-index"));
    });
    var by = tools.querySelector(".sort-by"), order = tools.querySelector(".sort-order");
    var lo = tools.querySelector(".min-score"), hi = tools.querySelector(".max-score");
    var text = tools.querySelector(".text-filter"), failed = tools.querySelector(".failed-only");
    var count = tools.querySelector(".shown-count");
    function apply() {
      var metric = by.value === "" ? null : by.value;
      var desc = order.value === "desc";
      var min = parseFloat(lo.value), max = parseFloat(hi.value), q = text.value.toLowerCase();
      var shown = 0;
      cards.forEach(function (c) {
        var s = metric === null ? null : num(c.cm3Scores[metric]);
        var ok = true;
        if (metric !== null && !isNaN(min)) { ok = ok && s !== null && s >= min; }
        if (metric !== null && !isNaN(max)) { ok = ok && s !== null && s <= max; }
        if (failed.checked) { ok = ok && c.getAttribute("data-failed") === "1"; }
        if (q) { ok = ok && c.textContent.toLowerCase().indexOf(q) >= 0; }
        c.hidden = !ok;
        if (ok) { shown += 1; }
      });
      var sorted = cards.slice().sort(function (a, b) {
        if (metric === null) { return desc ? b.cm3Index - a.cm3Index : a.cm3Index - b.cm3Index; }
        var x = num(a.cm3Scores[metric]), y = num(b.cm3Scores[metric]);
        if (x === null && y === null) { return a.cm3Index - b.cm3Index; }
        if (x === null) { return 1; }
        if (y === null) { return -1; }
        return desc ? y - x : x - y;
      });
      sorted.forEach(function (c) { grid.appendChild(c); });
      count.textContent = shown + " of " + cards.length + " shown";
    }
    [by, order, lo, hi, text, failed].forEach(function (el) {
      el.addEventListener("input", apply);
      el.addEventListener("change", apply);
    });
    apply();
  }
  Array.prototype.forEach.call(document.querySelectorAll(".sample-tools"), setup);
})();
