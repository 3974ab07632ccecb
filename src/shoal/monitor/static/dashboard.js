// Shoal dashboard: polls /api/state and renders it with plain DOM and inline SVG.
// Everything that comes from peers is inserted as text, never as markup.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const POLL_MS = 2000;
const PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2",
                 "#ca8a04", "#db2777", "#4b5563", "#65a30d"];
const colors = new Map();

function colorOf(peer) {
  if (!colors.has(peer)) colors.set(peer, PALETTE[colors.size % PALETTE.length]);
  return colors.get(peer);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function short(peer) { return peer.length > 12 ? peer.slice(0, 12) + "…" : peer; }

function fmt(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return x.toExponential(2);
  return x.toFixed(digits === undefined ? (a >= 100 ? 0 : a >= 10 ? 1 : 2) : digits);
}

function fmtBits(bps) {
  if (bps === null || bps === undefined) return "–";
  const units = [["G", 1e9], ["M", 1e6], ["k", 1e3]];
  for (const [u, s] of units) if (bps >= s) return (bps / s).toFixed(1) + " " + u + "bit/s";
  return bps.toFixed(0) + " bit/s";
}

function fmtAgo(s) {
  if (s < 60) return s.toFixed(0) + " s ago";
  if (s < 3600) return (s / 60).toFixed(0) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

function fmtClock(t) {
  return new Date(t * 1000).toLocaleTimeString([], {hour12: false});
}

// A line chart: series = [{name, color, points: [[x, y], ...]}].
function lineChart(container, series, xLabel, fromZero) {
  container.replaceChildren();
  const W = 420, H = 200, L = 46, R = 10, T = 10, B = 26;
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img"});
  const all = series.flatMap(s => s.points);
  if (all.length === 0) {
    const t = svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"});
    t.textContent = "no data yet";
    root.append(t);
    container.append(root);
    return;
  }
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (fromZero) y0 = Math.min(0, y0);
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
  y0 = fromZero && y0 >= 0 ? y0 : y0 - pad;
  y1 += pad;
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  root.append(svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}));
  root.append(svg("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}));
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4;
    const y = sy(yv);
    root.append(svg("line", {x1: L, y1: y, x2: W - R, y2: y, class: "axis", "stroke-dasharray": "2 3"}));
    const t = svg("text", {x: L - 4, y: y + 3, "text-anchor": "end", class: "tick"});
    t.textContent = fmt(yv);
    root.append(t);
  }
  for (let i = 0; i <= 3; i++) {
    const xv = x0 + (x1 - x0) * i / 3;
    const t = svg("text", {x: sx(xv), y: H - 8, "text-anchor": i === 0 ? "start" : i === 3 ? "end" : "middle", class: "tick"});
    t.textContent = xLabel === "time" ? fmtClock(xv) : fmt(xv, 0);
    root.append(t);
  }
  for (const s of series) {
    if (s.points.length === 0) continue;
    const pts = s.points.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    root.append(svg("polyline", {points: pts, class: "series", stroke: s.color,
                                 "data-series": s.name, "data-n": String(s.points.length)}));
    const last = s.points[s.points.length - 1];
    root.append(svg("circle", {cx: sx(last[0]), cy: sy(last[1]), r: 2.5, fill: s.color}));
  }
  container.append(root);
  if (series.length > 1) {
    const legend = el("div", {class: "legend"});
    for (const s of series) {
      const swatch = el("i");
      swatch.style.background = s.color;
      legend.append(el("span", {}, swatch, short(s.name)));
    }
    container.append(legend);
  }
}

// Series points are [t, step, value]; x is the step or the time.
function perPeerSeries(table, x) {
  const xi = x === "time" ? 0 : 1;
  return Object.entries(table).map(([peer, pts]) => ({
    name: peer, color: colorOf(peer), points: pts.map(p => [p[xi], p[2]]),
  }));
}

function timeBar(parts) {
  const bar = el("div", {class: "bar"});
  for (const name of ["compute", "communication", "waiting", "other"]) {
    const f = Math.max(0, Math.min(1, parts[name] || 0));
    const seg = el("span", {class: name, title: `${name} ${(f * 100).toFixed(0)}%`});
    seg.style.width = (f * 100).toFixed(1) + "%";
    bar.append(seg);
  }
  return bar;
}

function renderCards(state) {
  const s = state.swarm;
  const cards = [
    ["peers", s.peers + (s.stale_peers ? ` (+${s.stale_peers} stale)` : "")],
    ["step", s.step],
    ["samples/s", fmt(s.samples_per_s, 1)],
    ["median loss", fmt(s.loss, 3)],
    ["alerts", state.alerts.length],
  ];
  document.getElementById("cards").replaceChildren(...cards.map(([label, value]) =>
    el("div", {class: "card"}, el("div", {class: "label"}, label), el("div", {class: "value"}, value))));
}

function renderAlerts(alerts) {
  const list = document.getElementById("alerts");
  if (alerts.length === 0) {
    list.replaceChildren(el("li", {class: "none"}, "No alerts: the swarm looks healthy."));
    return;
  }
  list.replaceChildren(...alerts.map(a =>
    el("li", {class: a.severity, "data-kind": a.kind}, el("span", {class: "kind"}, a.kind.replace("_", " ")), a.message)));
}

function renderBreakdown(b) {
  const box = document.getElementById("breakdown");
  if (!b) { box.replaceChildren(el("div", {class: "muted"}, "no step timings published yet")); return; }
  const legend = el("div", {class: "bar-legend"});
  const vars = {compute: "--compute", communication: "--comm", waiting: "--wait", other: "--other"};
  for (const [name, v] of Object.entries(vars)) {
    const swatch = el("i");
    swatch.style.background = `var(${v})`;
    legend.append(el("span", {}, swatch, `${name} ${(100 * (b[name] || 0)).toFixed(0)}%`));
  }
  box.replaceChildren(timeBar(b), legend);
}

function renderPeers(peers, alerts) {
  const flagged = new Map(alerts.filter(a => a.peer).map(a => [a.peer, a.kind]));
  const body = document.querySelector("#peers tbody");
  body.replaceChildren(...peers.map(p => {
    const link = p.stale ? el("span", {class: "badge stale"}, "stale")
                         : el("span", {class: "badge " + p.reachability}, p.reachability);
    const parts = {compute: p.compute_frac, communication: p.comm_frac, waiting: p.wait_frac};
    parts.other = Math.max(0, 1 - p.compute_frac - p.comm_frac - p.wait_frac);
    const flag = flagged.get(p.peer);
    const cls = (p.stale ? "stale" : "") + (flag ? " flagged" : "");
    const row = el("tr", {class: cls, "data-peer": p.peer},
      el("td", {class: "peer", title: flag ? `${p.peer} (${flag})` : p.peer}, short(p.peer)),
      el("td", {}, p.role),
      el("td", {}, p.stage === null ? "–" : p.stage),
      el("td", {}, link),
      el("td", {class: "num"}, p.step),
      el("td", {class: "num"}, fmt(p.loss, 3)),
      el("td", {class: "num"}, fmt(p.samples_per_s, 1)),
      el("td", {class: "num"}, `${fmtBits(p.up_bps)} / ${fmtBits(p.down_bps)}`),
      el("td", {class: "num"}, `${fmtBits(p.tx_bps)} / ${fmtBits(p.rx_bps)}`),
      el("td", {}, timeBar(parts)),
      el("td", {class: "num"}, fmtAgo(p.last_seen_s)));
    return row;
  }));
}

function renderEvents(events) {
  const list = document.getElementById("events");
  if (events.length === 0) { list.replaceChildren(el("li", {class: "muted"}, "no events from this source")); return; }
  list.replaceChildren(...events.slice(0, 40).map(e => el("li", {},
    el("span", {class: "time"}, fmtClock(e.t)), el("span", {class: "who"}, short(e.peer)),
    el("span", {class: "kind"}, e.kind), el("span", {class: "text"}, e.text))));
}

function render(state) {
  renderCards(state);
  renderAlerts(state.alerts);
  lineChart(document.getElementById("chart-loss"), perPeerSeries(state.series.loss, "step"), "step");
  lineChart(document.getElementById("chart-val"), perPeerSeries(state.series.val, "step"), "step");
  lineChart(document.getElementById("chart-samples"), perPeerSeries(state.series.samples, "time"), "time", true);
  renderBreakdown(state.breakdown);
  renderPeers(state.peers, state.alerts);
  renderEvents(state.events);
  document.getElementById("status").textContent =
    `${state.source} · updated ${fmtClock(state.now)}`;
}

async function poll() {
  try {
    const response = await fetch("/api/state", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (err) {
    document.getElementById("status").textContent = "cannot reach the monitor: " + err.message;
  }
}

poll();
setInterval(poll, POLL_MS);
