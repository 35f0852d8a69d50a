/* Dashboard behaviour: live relative times, copy buttons, and the pages' polling of /ui/*.json.
   Pages are fully rendered by the server, figures included (SVG images); this only keeps them
   current without a reload. */
(function () {
  "use strict";

  function $(selector, root) {
    return (root || document).querySelector(selector);
  }

  // ---- times -----------------------------------------------------------------------------------

  function duration(seconds) {
    seconds = Math.max(0, seconds);
    if (seconds < 10) return seconds.toFixed(1) + " s";
    if (seconds < 60) return Math.round(seconds) + " s";
    var total = Math.round(seconds);
    var minutes = Math.floor(total / 60);
    if (minutes < 10) return minutes + " min " + String(total % 60).padStart(2, "0") + " s";
    if (minutes < 60) return minutes + " min";
    var hours = Math.floor(minutes / 60);
    if (hours < 48) return hours + " h " + String(minutes % 60).padStart(2, "0") + " min";
    return Math.floor(hours / 24) + " d " + (hours % 24) + " h";
  }

  function ago(seconds) {
    if (seconds < 5) return "just now";
    if (seconds < 60) return Math.floor(seconds) + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 48 * 3600) return Math.floor(seconds / 3600) + " h ago";
    return Math.floor(seconds / 86400) + " d ago";
  }

  function since(iso) {
    var t = Date.parse(iso);
    return isNaN(t) ? null : (Date.now() - t) / 1000;
  }

  function refreshTimes(root) {
    (root || document).querySelectorAll("[data-since]").forEach(function (node) {
      var s = since(node.getAttribute("data-since"));
      if (s !== null) node.textContent = ago(s);
    });
    (root || document).querySelectorAll("[data-elapsed-from]").forEach(function (node) {
      var s = since(node.getAttribute("data-elapsed-from"));
      if (s !== null) node.textContent = duration(s);
    });
  }

  // ---- copy buttons (delegated: the buttons live in fragments that polling redraws) ------------

  function fallbackCopy(text) {
    // navigator.clipboard needs a secure context; plain http on a LAN address is not one.
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try {
      ok = document.execCommand("copy");
    } catch (error) {
      ok = false;
    }
    document.body.removeChild(area);
    return ok;
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy-target]");
    if (!button) return;
    var source = document.getElementById(button.getAttribute("data-copy-target"));
    if (!source) return;
    var text = source.textContent.trim();
    var label = button.getAttribute("data-label") || button.textContent;
    button.setAttribute("data-label", label);
    function done(ok) {
      button.textContent = ok ? "Copied ✓" : "Copy failed";
      if (ok) button.setAttribute("data-copied", "");
      window.setTimeout(function () {
        button.textContent = label;
        button.removeAttribute("data-copied");
      }, 1800);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, function () { done(fallbackCopy(text)); });
    } else {
      done(fallbackCopy(text));
    }
  });

  // ---- polling --------------------------------------------------------------------------------

  function getJSON(url) {
    return fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 401) {
          // The session ended (signed out elsewhere, or the key was revoked).
          window.location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
          throw new Error("signed out");
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      });
  }

  // Calls `tick` every `interval` ms; a tick resolving to false stops it. Errors back off up to 30 s
  // and call `onError`; polling pauses while the tab is hidden.
  function poll(tick, interval, onError, onOk) {
    var banner = $("#poll-error");
    var failures = 0;
    var delay = interval;
    var timer = null;
    var stopped = false;
    function run() {
      timer = null;
      if (document.hidden) return;
      tick().then(function (more) {
        delay = interval;
        failures = 0;
        if (banner) banner.hidden = true;
        if (onOk) onOk();
        if (more === false) {
          stopped = true;
        } else {
          schedule();
        }
      }, function (error) {
        delay = Math.min(delay * 2, 30000);
        failures += 1;
        // One miss is a blip (a restart, a slow query); say so only when it persists.
        if (banner && failures >= 2) banner.hidden = false;
        if (onError) onError(error);
        schedule();
      });
    }
    function schedule() {
      if (!stopped && timer === null) timer = window.setTimeout(run, delay);
    }
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && !stopped && timer === null) run();
    });
    schedule();
  }

  function setLive(state, text) {
    var node = $("#live-indicator");
    if (!node) return;
    node.setAttribute("data-state", state);
    $(".live-text", node).textContent = text;
  }

  function replace(node, markup) {
    if (node && node._html !== markup) {
      node.innerHTML = markup;
      node._html = markup;
      refreshTimes(node);
    }
  }

  // ---- figures: SVGs drawn by the server -----------------------------------------------------

  // Points the image at the figure's `version` (the data it shows); a new URL makes the browser
  // fetch it again, and it keeps showing the old figure until the new one has loaded.
  function refreshFigure(img, version, query) {
    if (!img) return;
    var url = img.getAttribute("data-src") + "?v=" + encodeURIComponent(version) + (query ? "&" + query : "");
    if (img.getAttribute("src") !== url) img.setAttribute("src", url);
  }

  // ---- jobs page ------------------------------------------------------------------------------

  function initJobs() {
    var box = $("#jobs-results");
    if (!box) return;
    var url = box.getAttribute("data-poll");
    poll(function () {
      return getJSON(url).then(function (data) {
        replace(box, data.html);
      });
    }, 2000, function () {
      setLive("error", "Connection lost, retrying…");
    }, function () {
      setLive("live", "Live");
    });
  }

  // ---- job page -------------------------------------------------------------------------------

  function initJob() {
    var dataNode = $("#job-data");
    if (!dataNode) return;
    var data = JSON.parse(dataNode.textContent);

    // The curves' controls: which stage kinds, how much smoothing. A change redraws the figures
    // and puts the choice in the address, so a reload or a shared link shows the same curves.
    var controls = $("#curve-controls");
    var shownVersion = data.metrics_after;

    function curveQuery() {
      if (!controls) return "";
      var params = new URLSearchParams();
      params.set("smoothing", $("#curve-smoothing", controls).value);
      var kind = $("#curve-kind", controls).value;
      if (kind) params.set("kind", kind);
      return params.toString();
    }

    function refreshCurves(version) {
      shownVersion = version;
      refreshFigure($("#chart-loss"), version, curveQuery());
      refreshFigure($("#chart-accuracy"), version, curveQuery());
    }

    if (controls) {
      var smoothing = $("#curve-smoothing", controls);
      var shown = $("#curve-smoothing-value", controls);
      function redraw() {
        history.replaceState(null, "", location.pathname + "?" + curveQuery());
        refreshCurves(shownVersion);
      }
      // The number follows the slider as it moves; the figures redraw once it is let go.
      smoothing.addEventListener("input", function () { shown.textContent = Number(smoothing.value).toFixed(2); });
      smoothing.addEventListener("change", redraw);
      $("#curve-kind", controls).addEventListener("change", redraw);
      controls.addEventListener("submit", function (event) { event.preventDefault(); redraw(); });
    }

    function appendLogs(lines, names) {
      var box = $("#job-logs");
      if (!box || !lines.length) return;
      var atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
      var empty = $(".logs-empty", box);
      if (empty) empty.remove();
      lines.forEach(function (line) {
        var row = document.createElement("div");
        row.className = "log-line log-" + line.level;
        var time = new Date(line.created_at);
        var parts = [
          ["log-time", isNaN(time) ? "" : time.toISOString().slice(11, 19)],
          ["log-level", line.level],
          ["log-stage", line.stage_id ? names[line.stage_id] || "job" : "job"],
          ["log-msg", line.message],
        ];
        parts.forEach(function (part) {
          var span = document.createElement("span");
          span.className = part[0];
          span.textContent = part[1];
          row.appendChild(span);
        });
        box.appendChild(row);
      });
      var count = $("#logs-count");
      if (count) {
        var n = box.querySelectorAll(".log-line").length;
        count.textContent = n + (n === 1 ? " line" : " lines");
      }
      if (atBottom) box.scrollTop = box.scrollHeight;
    }

    var logs = $("#job-logs");
    if (logs) logs.scrollTop = logs.scrollHeight;
    if (data.terminal) return;

    var metricsAfter = data.metrics_after;
    var logsAfter = data.logs_after;
    var base = "/ui/jobs/" + encodeURIComponent(data.job_id) + ".json";
    poll(function () {
      var url = base + "?metrics_after=" + metricsAfter + "&logs_after=" + logsAfter;
      return getJSON(url).then(function (live) {
        replace($("#job-header"), live.fragments.header);
        replace($("#job-timeline"), live.fragments.timeline);
        replace($("#job-results"), live.fragments.results);
        appendLogs(live.logs, live.stage_names);
        // The newest metric point's id versions the curves: reload them only when it moves.
        if (live.metrics_after !== metricsAfter) refreshCurves(live.metrics_after);
        metricsAfter = live.metrics_after;
        logsAfter = live.logs_after;
        if (!live.terminal) return true;
        // Finished: draw the curves once more. A point that committed after a newer one (two
        // stages writing at once) does not move the newest id, so it may not be drawn yet.
        refreshCurves(metricsAfter + "-end");
        return false;
      });
    }, 2000);
  }

  // ---- sweep page -----------------------------------------------------------------------------

  function initSweep() {
    var dataNode = $("#sweep-data");
    if (!dataNode) return;
    var data = JSON.parse(dataNode.textContent);
    if (data.terminal) return;
    poll(function () {
      return getJSON("/ui/sweeps/" + encodeURIComponent(data.sweep_id) + ".json").then(function (live) {
        replace($("#sweep-header"), live.fragments.header);
        replace($("#sweep-tables"), live.fragments.tables);
        // The version is a hash of the figure's data: the image reloads only when a value changed.
        refreshFigure($("#sweep-plot"), live.plot_version);
        return !live.terminal;
      });
    }, 3000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    refreshTimes(document);
    window.setInterval(function () { refreshTimes(document); }, 1000);
    var page = document.body.getAttribute("data-page");
    if (page === "jobs") initJobs();
    if (page === "job") initJob();
    if (page === "sweep") initSweep();
  });
})();
