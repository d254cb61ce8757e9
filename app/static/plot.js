// Line charts as SVG, drawn from JSON: FaceID's learning curves and ROC curves.
// lineChart({title, series: [{name, points: [[x, y], ...], color}], xLabel, yLabel, xLog,
//            yMin, yMax, markers: [{x, y, label, color}]}) -> an <svg> element.
(function () {
"use strict";

const PALETTE = ["#2f62d9", "#d9482f", "#1a7f45", "#a15c00", "#7b3fc4", "#0f8b8d", "#c2185b", "#555"];
const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const raw = span / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

function fmtTick(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a < 0.01) return v.toExponential(0);
  return String(+v.toPrecision(3));
}

function lineChart(opts) {
  const W = 520, H = 300, L = 52, R = 14, T = 24, B = 40;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart" });
  const series = (opts.series || []).filter((s) => s.points && s.points.length);
  svg.appendChild(svgEl("text", { x: L, y: 15, class: "title" }, opts.title || ""));
  const tx = (x) => (opts.xLog ? Math.log10(Math.max(x, opts.xMinLog || 1e-6)) : x);
  let xs = [], ys = [];
  for (const s of series) for (const [x, y] of s.points) { if (isFinite(tx(x))) xs.push(tx(x)); if (isFinite(y)) ys.push(y); }
  if (!xs.length) {
    svg.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, opts.empty || "no data yet"));
    return svg;
  }
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(...ys);
  let y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...ys);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const px = (x) => L + ((tx(x) - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const axes = svgEl("g", { stroke: "#d9dde4" });
  let xt = opts.xLog ? niceTicks(Math.ceil(x0), Math.floor(x1), 6).filter(Number.isInteger) : niceTicks(x0, x1, 6);
  if (opts.xInteger) xt = xt.filter(Number.isInteger);  // epochs
  for (const t of xt) {
    const xv = opts.xLog ? Math.pow(10, t) : t;
    axes.appendChild(svgEl("line", { x1: px(xv), x2: px(xv), y1: T, y2: H - B }));
    svg.appendChild(svgEl("text", { x: px(xv), y: H - B + 14, "text-anchor": "middle" },
                          opts.xLog ? `1e${t}` : fmtTick(t)));
  }
  for (const t of niceTicks(y0, y1, 5)) {
    axes.appendChild(svgEl("line", { x1: L, x2: W - R, y1: py(t), y2: py(t) }));
    svg.appendChild(svgEl("text", { x: L - 5, y: py(t) + 4, "text-anchor": "end" }, fmtTick(t)));
  }
  svg.insertBefore(axes, svg.firstChild.nextSibling);
  svg.appendChild(svgEl("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, opts.xLabel || ""));
  svg.appendChild(svgEl("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
                                  transform: `rotate(-90 12 ${(T + H - B) / 2})` }, opts.yLabel || ""));
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const pts = s.points.filter(([x, y]) => isFinite(tx(x)) && isFinite(y));
    const d = pts.map(([x, y], j) => `${j ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join("");
    svg.appendChild(svgEl("path", { d, fill: "none", stroke: color, "stroke-width": 1.8, class: "series",
                                    "data-name": s.name, "data-points": pts.length }));
    if (pts.length <= 60) {
      for (const [x, y] of pts) {
        const dot = svgEl("circle", { cx: px(x), cy: py(y), r: 2.5, fill: color, class: "point" });
        dot.appendChild(svgEl("title", {}, `${s.name}: ${fmtTick(x)}, ${(+y).toFixed(4)}`));
        svg.appendChild(dot);
      }
    }
    const ly = T + 4 + i * 14;
    svg.appendChild(svgEl("rect", { x: W - R - 150, y: ly - 8, width: 10, height: 3, fill: color }));
    svg.appendChild(svgEl("text", { x: W - R - 136, y: ly - 3 }, s.name.length > 22 ? s.name.slice(0, 21) + "…" : s.name));
  });
  for (const m of opts.markers || []) {
    if (!isFinite(tx(m.x)) || !isFinite(m.y)) continue;
    const g = svgEl("g", { class: "marker" });
    g.appendChild(svgEl("circle", { cx: px(m.x), cy: py(m.y), r: 5, fill: "none", stroke: m.color || "#1d2330",
                                    "stroke-width": 2 }));
    g.appendChild(svgEl("text", { x: px(m.x) + 7, y: py(m.y) + 14, style: "fill:#1d2330" }, m.label));
    svg.appendChild(g);
  }
  return svg;
}

window.FaceIDPlot = { lineChart, PALETTE };
})();
