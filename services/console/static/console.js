// bulwark console: live regions. Each element with data-live holds server-rendered HTML; the
// server pushes a new rendering over server-sent events when it changes (no polling here).
"use strict";
document.querySelectorAll("[data-live]").forEach(function (el) {
  var source = new EventSource(el.getAttribute("data-live"));
  source.onmessage = function (e) {
    // Keep what a person is typing in a reason field across a refresh of its region.
    var typed = {};
    el.querySelectorAll("input.reason").forEach(function (i) {
      if (i.value) { typed[i.form.elements["intent_id"] ? i.form.elements["intent_id"].value : i.form.elements["proposal_id"].value] = i.value; }
    });
    el.innerHTML = e.data;
    el.querySelectorAll("input.reason").forEach(function (i) {
      var key = i.form.elements["intent_id"] ? i.form.elements["intent_id"].value : i.form.elements["proposal_id"].value;
      if (typed[key]) { i.value = typed[key]; }
    });
    el.setAttribute("data-updated", String(Date.now()));
  };
  source.addEventListener("ended", function () { source.close(); });
});
