/* W2SChart: a small SVG line chart, written for this dashboard (no plotting library, works offline).

   W2SChart.render(container, {
     x: {label, categories?: [names], titles?: [full names], integer?: bool},
     y: {label, min?, max?, digits?},
     series: [{label, key?, color, dash?, width?, markers?, points: [[x, y|null], ...]}],
     height?: px, empty?: text
   })

   Numeric or categorical x (a category's index is its x). A null y breaks the line. Series that share
   a `key` share one legend entry, which shows and hides them together. Hovering shows the values at
   the nearest x. The chart redraws itself when its container is resized. */
(function () {
  "use strict";

  var NS = "http://www.w3.org/2000/svg";

  function svg(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (key) {
      if (attrs[key] !== undefined && attrs[key] !== null) node.setAttribute(key, attrs[key]);
    });
    if (parent) parent.appendChild(node);
    return node;
  }

  function html(name, className, parent) {
    var node = document.createElement(name);
    if (className) node.className = className;
    if (parent) parent.appendChild(node);
    return node;
  }

  function finite(value) {
    return typeof value === "number" && isFinite(value);
  }

  // Round steps (1, 2 or 5 times a power of ten) so tick labels stay short.
  function niceStep(range, count) {
    var rough = range / Math.max(1, count);
    var power = Math.pow(10, Math.floor(Math.log10(rough)));
    var fraction = rough / power;
    return (fraction < 1.5 ? 1 : fraction < 3 ? 2 : fraction < 7 ? 5 : 10) * power;
  }

  function ticks(min, max, count, integer) {
    var step = niceStep(max - min, count);
    if (integer) step = Math.max(1, Math.round(step));
    var values = [];
    for (var v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) {
      values.push(Number(v.toFixed(10)));
    }
    return { values: values, step: step };
  }

  function tickFormat(value, step) {
    var decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
    if (Math.abs(value) >= 10000) return (value / 1000).toFixed(0) + "k";
    return value.toFixed(decimals);
  }

  function extent(values) {
    var lo = Infinity;
    var hi = -Infinity;
    values.forEach(function (v) {
      if (finite(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    });
    return lo <= hi ? [lo, hi] : null;
  }

  function keyOf(series) {
    return series.key || series.label;
  }

  function render(container, spec) {
    container._w2sSpec = spec;
    var hidden = container._w2sHidden || (container._w2sHidden = {});
    observe(container);
    while (container.firstChild) container.removeChild(container.firstChild);

    var all = (spec.series || []).filter(function (s) {
      return (s.points || []).some(function (p) { return finite(p[1]); });
    });
    if (!all.length) {
      var empty = html("div", "chart-empty", container);
      empty.textContent = spec.empty || container.getAttribute("data-empty") || "No data yet.";
      return;
    }
    var shown = all.filter(function (s) { return !hidden[keyOf(s)]; });
    var domainSeries = shown.length ? shown : all;

    var categories = spec.x.categories || null;
    var width = Math.max(280, container.clientWidth || 600);
    var height = spec.height || (container.classList.contains("chart-tall") ? 400 : 240);
    var margin = { top: 12, right: 16, bottom: categories ? 48 : 40, left: 54 };
    var innerW = width - margin.left - margin.right;
    var innerH = height - margin.top - margin.bottom;

    var xs = [];
    var ys = [];
    domainSeries.forEach(function (s) {
      s.points.forEach(function (p) {
        if (finite(p[1])) {
          xs.push(p[0]);
          ys.push(p[1]);
        }
      });
    });
    var xDomain;
    if (categories) {
      xDomain = [-0.5, categories.length - 0.5];
    } else {
      xDomain = extent(xs);
      if (xDomain[0] === xDomain[1]) xDomain = [xDomain[0] - 1, xDomain[1] + 1];
    }
    var yDomain = extent(ys);
    var pad = (yDomain[1] - yDomain[0]) * 0.08 || Math.max(Math.abs(yDomain[0]) * 0.05, 0.05);
    yDomain = [yDomain[0] - pad, yDomain[1] + pad];
    if (finite(spec.y.min)) yDomain[0] = Math.max(spec.y.min, yDomain[0]);
    if (finite(spec.y.max)) yDomain[1] = Math.min(spec.y.max, yDomain[1]);
    if (yDomain[0] >= yDomain[1]) yDomain = [yDomain[0] - 0.05, yDomain[0] + 0.05];

    function sx(v) {
      return margin.left + ((v - xDomain[0]) / (xDomain[1] - xDomain[0])) * innerW;
    }
    function sy(v) {
      return margin.top + innerH - ((v - yDomain[0]) / (yDomain[1] - yDomain[0])) * innerH;
    }

    var root = svg("svg", {
      width: width,
      height: height,
      viewBox: "0 0 " + width + " " + height,
      role: "img",
      "aria-label": (spec.y.label || "value") + " by " + (spec.x.label || "x"),
    }, container);

    // grid and axes
    var grid = svg("g", { class: "grid" }, root);
    var axis = svg("g", { class: "axis" }, root);
    var yTicks = ticks(yDomain[0], yDomain[1], Math.max(3, Math.round(innerH / 45)));
    yTicks.values.forEach(function (v) {
      svg("line", { x1: margin.left, x2: margin.left + innerW, y1: sy(v), y2: sy(v) }, grid);
      var label = svg("text", { x: margin.left - 8, y: sy(v) + 3.5, "text-anchor": "end" }, axis);
      label.textContent = tickFormat(v, yTicks.step);
    });
    svg("line", {
      x1: margin.left, x2: margin.left + innerW, y1: margin.top + innerH, y2: margin.top + innerH,
    }, axis);
    if (categories) {
      var band = innerW / Math.max(1, categories.length);
      var maxChars = Math.max(4, Math.floor(band / 6.5));
      categories.forEach(function (name, i) {
        var x = sx(i);
        svg("line", { x1: x, x2: x, y1: margin.top + innerH, y2: margin.top + innerH + 4 }, axis);
        var label = svg("text", { x: x, y: margin.top + innerH + 17, "text-anchor": "middle" }, axis);
        label.textContent = name.length > maxChars ? name.slice(0, maxChars - 1) + "…" : name;
        var title = svg("title", {}, label);
        title.textContent = (spec.x.titles && spec.x.titles[i]) || name;
      });
    } else {
      var xTicks = ticks(xDomain[0], xDomain[1], Math.max(2, Math.round(innerW / 80)), spec.x.integer);
      xTicks.values.forEach(function (v) {
        if (v < xDomain[0] || v > xDomain[1]) return;
        svg("line", { x1: sx(v), x2: sx(v), y1: margin.top + innerH, y2: margin.top + innerH + 4 }, axis);
        var label = svg("text", { x: sx(v), y: margin.top + innerH + 17, "text-anchor": "middle" }, axis);
        label.textContent = tickFormat(v, xTicks.step);
      });
    }
    if (spec.x.label) {
      var xl = svg("text", {
        class: "axis-label", x: margin.left + innerW / 2, y: height - 6, "text-anchor": "middle",
      }, root);
      xl.textContent = spec.x.label;
    }
    if (spec.y.label) {
      var yl = svg("text", {
        class: "axis-label", transform: "translate(13," + (margin.top + innerH / 2) + ") rotate(-90)",
        "text-anchor": "middle",
      }, root);
      yl.textContent = spec.y.label;
    }

    // lines, clipped to the plot area so a padded domain never draws over the axes
    var clipId = "clip-" + Math.random().toString(36).slice(2);
    var defs = svg("defs", {}, root);
    var clip = svg("clipPath", { id: clipId }, defs);
    svg("rect", { x: margin.left - 4, y: margin.top - 4, width: innerW + 8, height: innerH + 8 }, clip);
    var plot = svg("g", { "clip-path": "url(#" + clipId + ")" }, root);
    shown.forEach(function (s) {
      var group = svg("g", { class: "series" }, plot);
      var d = "";
      var pen = false;
      s.points.forEach(function (p) {
        if (!finite(p[1])) {
          pen = false;
          return;
        }
        d += (pen ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1);
        pen = true;
      });
      svg("path", {
        d: d, stroke: s.color, "stroke-width": s.width || 1.8, "stroke-dasharray": s.dash || null,
      }, group);
      var drawn = s.points.filter(function (p) { return finite(p[1]); });
      var markers = s.markers !== undefined ? s.markers : categories || drawn.length <= 24;
      if (markers) {
        drawn.forEach(function (p) {
          svg("circle", {
            cx: sx(p[0]), cy: sy(p[1]), r: 3.2, fill: s.color, stroke: "#fff", "stroke-width": 1.2,
          }, group);
        });
      }
    });

    hover(container, root, shown, categories, spec, sx, sy, margin, innerW, innerH, xDomain);
    if (spec.legend !== false) legend(container, all, hidden, spec);
  }

  // The values at the x nearest the pointer, in a tooltip beside a vertical guide.
  function hover(container, root, shown, categories, spec, sx, sy, margin, innerW, innerH, xDomain) {
    var guide = svg("line", { class: "hover-line", y1: margin.top, y2: margin.top + innerH, visibility: "hidden" }, root);
    var overlay = svg("rect", {
      x: margin.left, y: margin.top, width: innerW, height: innerH, fill: "transparent",
    }, root);
    var tip = html("div", "chart-tooltip", container);
    tip.hidden = true;
    var digits = spec.y.digits !== undefined ? spec.y.digits : 3;

    overlay.addEventListener("mousemove", function (event) {
      var box = root.getBoundingClientRect();
      var px = event.clientX - box.left;
      var xValue = xDomain[0] + ((px - margin.left) / innerW) * (xDomain[1] - xDomain[0]);
      var target = categories ? Math.round(xValue) : xValue;
      var rows = [];
      var nearestX = null;
      shown.forEach(function (s) {
        var best = null;
        s.points.forEach(function (p) {
          if (!finite(p[1])) return;
          if (best === null || Math.abs(p[0] - target) < Math.abs(best[0] - target)) best = p;
        });
        if (best && (!categories || best[0] === target)) {
          rows.push({ series: s, point: best });
          if (nearestX === null || Math.abs(best[0] - target) < Math.abs(nearestX - target)) nearestX = best[0];
        }
      });
      if (!rows.length) {
        tip.hidden = true;
        guide.setAttribute("visibility", "hidden");
        return;
      }
      guide.setAttribute("x1", sx(nearestX));
      guide.setAttribute("x2", sx(nearestX));
      guide.setAttribute("visibility", "visible");
      while (tip.firstChild) tip.removeChild(tip.firstChild);
      var head = html("div", "", tip);
      head.textContent = categories ? categories[nearestX] : (spec.x.label || "x") + " " + nearestX;
      rows.sort(function (a, b) { return b.point[1] - a.point[1]; });
      rows.slice(0, 12).forEach(function (row) {
        var line = html("div", "tt-row", tip);
        var dot = html("span", "tt-dot", line);
        dot.style.background = row.series.color;
        var text = html("span", "", line);
        text.textContent = row.series.label + ": " + row.point[1].toFixed(digits);
      });
      tip.hidden = false;
      var left = sx(nearestX) + 12;
      if (left + tip.offsetWidth > container.clientWidth) left = sx(nearestX) - tip.offsetWidth - 12;
      tip.style.left = Math.max(0, left) + "px";
      tip.style.top = margin.top + "px";
    });
    overlay.addEventListener("mouseleave", function () {
      tip.hidden = true;
      guide.setAttribute("visibility", "hidden");
    });
  }

  function legend(container, all, hidden, spec) {
    var box = html("div", "chart-legend", container);
    var seen = {};
    all.forEach(function (s) {
      var key = keyOf(s);
      if (seen[key]) return;
      seen[key] = true;
      var button = html("button", "", box);
      button.type = "button";
      button.setAttribute("aria-pressed", hidden[key] ? "false" : "true");
      button.title = "show or hide";
      var sample = svg("svg", { viewBox: "0 0 26 10", "aria-hidden": "true" }, button);
      svg("line", {
        x1: 1, x2: 25, y1: 5, y2: 5, stroke: s.color, "stroke-width": Math.max(2, s.width || 2),
        "stroke-dasharray": s.dash || null, "stroke-linecap": "round",
      }, sample);
      var text = html("span", "", button);
      text.textContent = s.legendLabel || s.label;
      button.addEventListener("click", function () {
        hidden[key] = !hidden[key];
        render(container, spec);
      });
    });
  }

  // Redraw at the new width when the layout changes (window resize, sidebar, print).
  var observer = typeof ResizeObserver === "function"
    ? new ResizeObserver(function (entries) {
      entries.forEach(function (entry) {
        var node = entry.target;
        var width = Math.round(entry.contentRect.width);
        if (node._w2sSpec && node._w2sWidth !== undefined && node._w2sWidth !== width) {
          node._w2sWidth = width;
          window.requestAnimationFrame(function () { render(node, node._w2sSpec); });
        } else {
          node._w2sWidth = width;
        }
      });
    })
    : null;

  function observe(container) {
    if (observer && !container._w2sObserved) {
      container._w2sObserved = true;
      observer.observe(container);
    }
  }

  window.W2SChart = { render: render };
})();
