// The Tandem fleet dashboard: reads /v1/dashboard and draws SVG charts itself (no library, nothing
// fetched from elsewhere). The API token comes from the URL fragment: /#token=…
"use strict";

const COLORS = ["#3461d9", "#d9822b", "#8e44ad", "#1f9d6a", "#c0392b", "#16a2b8", "#7f8c8d"];
const SVG_NS = "http://www.w3.org/2000/svg";

// Parameters from the URL fragment (`#token=…&window=6h`): never sent to the server.
function fragment(name) {
  const match = new RegExp("(?:^|[#&])" + name + "=([^&]+)").exec(window.location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

// A round axis maximum at least `v` and its tick step (at most six ticks).
function axis(v) {
  for (const step of [0.01, 0.02, 0.05, 0.1, 0.2, 0.25]) {
    const max = Math.ceil(v / step - 1e-9) * step;
    if (max / step <= 5) return { max, step };
  }
  return { max: 1, step: 0.25 };
}

function el(tag, attributes, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function percent(x, digits) {
  return x === null || x === undefined ? "–" : (100 * x).toFixed(digits === undefined ? 1 : digits) + " %";
}

function ms(x) {
  if (x === null || x === undefined) return "–";
  return x >= 10000 ? (x / 1000).toFixed(0) + " s" : x >= 1000 ? (x / 1000).toFixed(1) + " s" : x + " ms";
}

function count(x) {
  return x >= 1e6 ? (x / 1e6).toFixed(1) + " M" : x >= 1e4 ? (x / 1e3).toFixed(0) + " k" : String(x);
}

function ago(then, now) {
  if (!then) return "never";
  const s = Math.max(0, Math.round((now - then) / 1000));
  return s < 60 ? s + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
}

function clock(t, span) {
  const d = new Date(t);
  const pad = (n) => String(n).padStart(2, "0");
  const time = pad(d.getHours()) + ":" + pad(d.getMinutes());
  return span > 2 * 86400000 ? pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + time : time;
}

function kpis(data) {
  const t = data.totals;
  const online = data.devices.filter((d) => d.status === "online").length;
  const over = t.call_ratio > data.budget_fraction;
  const cards = [
    ["Queries", count(t.queries), t.local + " local · " + t.cloud + " cloud"],
    ["Cloud call ratio", percent(t.call_ratio), "budget " + percent(data.budget_fraction, 0), over ? "bad" : "ok"],
    ["Help requested", percent(t.help_ratio), t.local_fallback + " answered locally instead"],
    ["Local latency", ms(t.local_latency_ms && t.local_latency_ms.p50), "p99 " + ms(t.local_latency_ms && t.local_latency_ms.p99)],
    ["Cloud latency", ms(t.cloud_latency_ms && t.cloud_latency_ms.p50), "p99 " + ms(t.cloud_latency_ms && t.cloud_latency_ms.p99)],
    ["Devices", online + " / " + data.devices.length, "online / known"],
  ];
  const root = document.getElementById("kpis");
  root.replaceChildren();
  for (const [label, value, sub, tone] of cards) {
    const card = document.createElement("div");
    card.className = "kpi";
    card.innerHTML = '<div class="label"></div><div class="value"></div><div class="sub"></div>';
    card.children[0].textContent = label;
    card.children[1].textContent = value;
    if (tone) card.children[1].classList.add(tone);
    card.children[2].textContent = sub;
    root.appendChild(card);
  }
}

function ratioChart(data) {
  const root = document.getElementById("ratio");
  const W = 760, H = 250, L = 46, R = 14, T = 12, B = 28;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  const x0 = data.from_ms, x1 = data.to_ms;
  let top = Math.max(data.budget_fraction * 1.5, 0.1);
  for (const s of data.series) for (const p of s.points) if (p.queries > 0) top = Math.max(top, p.call_ratio * 1.05);
  const { max: yMax, step } = axis(Math.min(1, top));
  const x = (t) => L + ((t - x0) / (x1 - x0)) * (W - L - R);
  const y = (v) => T + (1 - v / yMax) * (H - T - B);
  for (let v = 0; v <= yMax + 1e-9; v += step) {
    svg.appendChild(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "axis" }));
    svg.appendChild(el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, percent(v, 0)));
  }
  svg.appendChild(el("rect", { x: L, y: y(data.budget_fraction), width: W - L - R, height: y(0) - y(data.budget_fraction), fill: "var(--band)" }));
  svg.appendChild(el("line", { x1: L, x2: W - R, y1: y(data.budget_fraction), y2: y(data.budget_fraction), stroke: "#1f9d6a", "stroke-dasharray": "5 4", "stroke-width": 1.5 }));
  svg.appendChild(el("text", { x: W - R - 4, y: y(data.budget_fraction) - 5, "text-anchor": "end", fill: "#1f9d6a" }, "budget " + percent(data.budget_fraction, 0)));
  const minute = 60000;
  const tick = [1, 5, 15, 30, 60, 120, 180, 360, 720, 1440].map((m) => m * minute).find((m) => (x1 - x0) / m <= 7) || 1440 * minute;
  const offset = new Date(x0).getTimezoneOffset() * minute;
  for (let t = Math.ceil((x0 - offset) / tick) * tick + offset; t <= x1; t += tick) {
    svg.appendChild(el("line", { x1: x(t), x2: x(t), y1: H - B, y2: H - B + 4, class: "axis" }));
    svg.appendChild(el("text", { x: x(t), y: H - 8, "text-anchor": "middle" }, clock(t, x1 - x0)));
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  data.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    // A ratio over a handful of queries is noise: buckets with fewer than 10 are not drawn.
    const points = s.points.filter((p) => p.queries >= 10).map((p) => [x(p.t + data.bucket_ms / 2), y(p.call_ratio)]);
    if (points.length > 1) {
      svg.appendChild(el("polyline", { points: points.map((p) => p.join(",")).join(" "), fill: "none", stroke: color, "stroke-width": 2, "stroke-linejoin": "round" }));
    }
    for (const [px, py] of points) svg.appendChild(el("circle", { cx: px, cy: py, r: points.length > 40 ? 1.8 : 3, fill: color }));
    const queries = s.points.reduce((a, p) => a + p.queries, 0);
    const cloud = s.points.reduce((a, p) => a + p.cloud, 0);
    const item = document.createElement("span");
    item.innerHTML = `<i style="background:${color}"></i>`;
    item.appendChild(document.createTextNode(`${s.model_version} · ${percent(queries ? cloud / queries : 0)} of ${count(queries)}`));
    legend.appendChild(item);
  });
  if (!data.series.length) svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no queries in this window"));
  root.replaceChildren(svg, legend);
}

// Log-spaced bins from 1 ms to 100 s, five per decade.
function bins(histogram) {
  const edges = [];
  for (let e = 0; e <= 25; e++) edges.push(Math.pow(10, e / 5));
  const counts = new Array(edges.length).fill(0);
  let total = 0;
  for (const [q, n] of histogram) {
    let i = edges.findIndex((edge) => q < edge);
    if (i < 0) i = edges.length - 1;
    counts[Math.max(0, i - 1)] += n;
    total += n;
  }
  return { edges, counts, total };
}

function latencyChart(data) {
  const root = document.getElementById("latency");
  const W = 500, H = 250, L = 40, R = 10, T = 12, B = 28;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  const local = bins(data.latency.local.histogram);
  const cloud = bins(data.latency.cloud.histogram);
  const share = (b, i) => (b.total ? b.counts[i] / b.total : 0);
  let top = 0.05;
  for (let i = 0; i < local.counts.length; i++) top = Math.max(top, share(local, i), share(cloud, i));
  const { max: yMax, step } = axis(top);
  const lo = 0, hi = 5;
  const x = (ms) => L + ((Math.log10(Math.max(ms, 1)) - lo) / (hi - lo)) * (W - L - R);
  const y = (v) => T + (1 - v / yMax) * (H - T - B);
  for (let v = 0; v <= yMax + 1e-9; v += step) {
    svg.appendChild(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "axis" }));
    svg.appendChild(el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, percent(v, 0)));
  }
  for (const [t, label] of [[1, "1 ms"], [10, "10 ms"], [100, "100 ms"], [1000, "1 s"], [10000, "10 s"], [100000, "100 s"]]) {
    svg.appendChild(el("text", { x: x(t), y: H - 8, "text-anchor": t === 1 ? "start" : t === 100000 ? "end" : "middle" }, label));
  }
  const series = [[local, "#3461d9", "local"], [cloud, "#d9822b", "cloud"]];
  for (const [b, color] of series) {
    for (let i = 0; i < b.counts.length - 1; i++) {
      const v = share(b, i);
      if (v <= 0) continue;
      const left = x(b.edges[i]), right = x(b.edges[i + 1]);
      svg.appendChild(el("rect", { x: left + 1, width: Math.max(1, right - left - 2), y: y(v), height: y(0) - y(v), fill: color, "fill-opacity": 0.55, stroke: color }));
    }
  }
  for (const [p, color] of [[data.latency.local.percentiles, "#3461d9"], [data.latency.cloud.percentiles, "#d9822b"]]) {
    if (!p) continue;
    svg.appendChild(el("line", { x1: x(p.p50), x2: x(p.p50), y1: T, y2: H - B, stroke: color, "stroke-dasharray": "3 3" }));
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const [key, color, name] of [["local", "#3461d9", "local"], ["cloud", "#d9822b", "cloud"]]) {
    const p = data.latency[key].percentiles;
    const item = document.createElement("span");
    item.innerHTML = `<i style="background:${color}"></i>`;
    item.appendChild(document.createTextNode(p ? `${name} · p50 ${ms(p.p50)} · p90 ${ms(p.p90)} · p99 ${ms(p.p99)}` : `${name} · none`));
    legend.appendChild(item);
  }
  root.replaceChildren(svg, legend);
}

function deviceTable(data) {
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  const devices = [...data.devices].sort((a, b) => b.queries - a.queries || a.id.localeCompare(b.id));
  for (const d of devices.slice(0, 200)) {
    const row = document.createElement("tr");
    const cells = [d.id, d.group || "–", d.reported_version || d.model_version || "–", updateText(d.update), null, count(d.queries), null, ms(d.local_p50_ms), ago(d.last_seen_ms, data.now_ms)];
    cells.forEach((text, i) => {
      const cell = document.createElement("td");
      if ([5, 6, 7].includes(i)) cell.className = "num";
      if (i === 3 && d.update) cell.className = "update " + d.update.state;
      if (i === 4) {
        const badge = document.createElement("span");
        badge.className = "status " + d.status;
        badge.textContent = d.status;
        cell.appendChild(badge);
      } else if (i === 6) {
        cell.textContent = percent(d.call_ratio);
        if (d.call_ratio > data.budget_fraction) cell.classList.add("over");
      } else {
        cell.textContent = text;
      }
      row.appendChild(cell);
    });
    body.appendChild(row);
  }
  document.getElementById("device-count").textContent =
    devices.length > 200 ? `busiest 200 of ${devices.length}` : `${devices.length} known`;
}

function updateText(update) {
  if (!update) return "–";
  return `v${update.version} ${update.state.replace("_", " ")}` + (update.detail ? `: ${update.detail}` : "");
}

function rolloutTable(data) {
  const card = document.getElementById("rollouts-card");
  card.hidden = data.rollouts.length === 0;
  const body = document.querySelector("#rollouts tbody");
  body.replaceChildren();
  for (const r of data.rollouts) {
    const row = document.createElement("tr");
    const stage = r.status === "completed" ? "all stages" : `${r.stage} of ${r.stages} (${r.stage_percent}%)`;
    const detail = r.reason || r.waiting || "";
    const cells = [`${r.model} v${r.version}` + (r.group ? ` · ${r.group}` : ""), null, stage, count(r.reached), count(r.rolled_back), detail, ago(r.created_ms, data.now_ms)];
    cells.forEach((text, i) => {
      const cell = document.createElement("td");
      if ([3, 4].includes(i)) cell.className = "num";
      if (i === 1) {
        const badge = document.createElement("span");
        badge.className = "status rollout-" + r.status;
        badge.textContent = r.status;
        cell.appendChild(badge);
      } else {
        cell.textContent = text;
      }
      if (i === 5) cell.className = "detail";
      row.appendChild(cell);
    });
    body.appendChild(row);
  }
}

async function refresh() {
  const window_ = document.getElementById("window").value;
  const headers = {};
  const t = fragment("token");
  if (t) headers.Authorization = "Bearer " + t;
  const error = document.getElementById("error");
  try {
    const response = await fetch("/v1/dashboard?window=" + encodeURIComponent(window_), { headers });
    if (!response.ok) throw new Error(response.status === 401 ? "The API needs a token: open this page as /#token=YOUR_TOKEN" : "HTTP " + response.status);
    const data = await response.json();
    error.hidden = true;
    kpis(data);
    ratioChart(data);
    latencyChart(data);
    rolloutTable(data);
    deviceTable(data);
    document.getElementById("updated").textContent = "updated " + new Date(data.now_ms).toLocaleTimeString();
    document.body.dataset.ready = "1";
  } catch (e) {
    error.textContent = String(e.message || e);
    error.hidden = false;
  }
}

const initialWindow = fragment("window");
if (initialWindow) {
  const select = document.getElementById("window");
  if (![...select.options].some((o) => o.value === initialWindow)) select.add(new Option(initialWindow, initialWindow));
  select.value = initialWindow;
}
document.getElementById("window").addEventListener("change", refresh);
refresh();
setInterval(refresh, 10000);
