// A small SVG chart for the admin page: lines (or bars) over time buckets. No library, no
// innerHTML: every element is created with the DOM API and every label is textContent.
// Each series' <path>/<g> carries data-series and data-values (the exact numbers drawn), and
// every point a <title> with its value, so a person hovering and a test reading the DOM see
// the same numbers the JSON had.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= value) return m * p;
  return 10 * p;
}

export function formatNumber(value, digits) {
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 0 : digits });
}

// series: [{key, label, values}], labels: bucket labels; kind: "line" | "bar".
export function drawChart(container, labels, series, kind, formatValue) {
  const width = 1100, height = 260, left = 70, right = 30, top = 12, bottom = 34;
  const plotW = width - left - right, plotH = height - top - bottom;
  const max = niceMax(Math.max(0, ...series.flatMap((s) => s.values)));
  const n = Math.max(labels.length, 1);
  const x = (i) => left + (n === 1 ? plotW / 2 : (i * plotW) / (n - 1));
  const y = (v) => top + plotH - (v / max) * plotH;
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });

  for (let t = 0; t <= 4; t++) {
    const v = (max * t) / 4;
    svg.append(svgEl("line", { class: "axis", x1: left, x2: width - right, y1: y(v), y2: y(v) }));
    const tick = svgEl("text", { class: "tick", x: left - 8, y: y(v) + 4, "text-anchor": "end" });
    tick.textContent = formatValue(v);
    svg.append(tick);
  }
  const every = Math.max(1, Math.ceil(n / 10));
  labels.forEach((label, i) => {
    if (i % every !== 0) return;
    const tick = svgEl("text", { class: "tick", x: x(i), y: height - 12, "text-anchor": "middle" });
    tick.textContent = label;
    svg.append(tick);
  });

  if (kind === "bar") {
    const slot = plotW / n, barW = Math.max(1, slot * 0.7);
    for (const s of series) {
      const group = svgEl("g", { class: `s-${s.key}`, "data-series": s.key, "data-values": s.values.join(",") });
      s.values.forEach((v, i) => {
        const bx = left + i * slot + (slot - barW) / 2;
        const rect = svgEl("rect", { x: bx, y: y(v), width: barW, height: Math.max(0, top + plotH - y(v)) });
        const title = svgEl("title");
        title.textContent = `${labels[i]}: ${formatValue(v)}`;
        rect.append(title);
        group.append(rect);
      });
      svg.append(group);
    }
  } else {
    for (const s of series) {
      const d = s.values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      svg.append(svgEl("path", { class: `line s-${s.key}`, d, "data-series": s.key, "data-values": s.values.join(",") }));
      const dots = svgEl("g", { class: `s-${s.key}` });
      s.values.forEach((v, i) => {
        const dot = svgEl("circle", { cx: x(i), cy: y(v), r: n > 60 ? 1.5 : 3 });
        const title = svgEl("title");
        title.textContent = `${s.label}, ${labels[i]}: ${formatValue(v)}`;
        dot.append(title);
        dots.append(dot);
      });
      svg.append(dots);
    }
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const s of series) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.className = `s-${s.key}`;
    item.append(swatch, document.createTextNode(s.label));
    legend.append(item);
  }
  container.replaceChildren(svg, legend);
}
