// qcstream dashboard: fetches /api/summary and /api/lag every few seconds and draws
// the charts as inline SVG. Plain JavaScript without libraries, so the page works
// without internet access.
"use strict";

const REFRESH_MS = 5000;
const SVG_NS = "http://www.w3.org/2000/svg";

// Sizes of the SVG drawings in user units. CSS scales them to the page width.
const BAR_CHART = { width: 800, rowHeight: 28, labelWidth: 140, valueWidth: 170 };
const RATE_CHART = { width: 480, height: 210, left: 44, right: 12, top: 16, bottom: 28 };

let lastDefectsKey = null;

function svgElement(tag, attributes, parent) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    element.setAttribute(name, String(value));
  }
  if (parent) parent.appendChild(element);
  return element;
}

function addTitle(element, text) {
  svgElement("title", {}, element).textContent = text;
}

function percent(rate) {
  return rate === null || rate === undefined ? "–" : (rate * 100).toFixed(1) + "%";
}

function clockTime(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function duration(seconds) {
  if (seconds % 3600 === 0) return seconds / 3600 + " h";
  if (seconds % 60 === 0) return seconds / 60 + " min";
  return seconds + " s";
}

function formatCount(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

async function fetchJson(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || url + " returned HTTP " + response.status);
  return body;
}

// --- cards -------------------------------------------------------------------

function renderCards(summary) {
  const throughput = summary.throughput;
  document.getElementById("throughput-value").textContent = formatCount(throughput.frames_per_minute);
  document.getElementById("throughput-detail").textContent = throughput.last_inspected_at
    ? "last minute; last frame inspected " + clockTime(throughput.last_inspected_at)
    : "no frame inspected yet";
  document.getElementById("frames-window-value").textContent = String(throughput.frames_in_window);
  document.getElementById("window-detail").textContent = "captured in the last " + duration(summary.window_seconds);

  const firing = summary.firing_alerts;
  document.getElementById("firing-value").textContent = String(firing.length);
  document.getElementById("firing-detail").textContent = firing.length
    ? firing.map((alert) => alert.line_id + ": " + alert.condition).join(", ")
    : "none";
}

function renderLag(lag) {
  const value = document.getElementById("lag-value");
  const detail = document.getElementById("lag-detail");
  if (lag.error) {
    value.textContent = "–";
    detail.textContent = lag.error;
    detail.classList.add("error");
    return;
  }
  detail.classList.remove("error");
  const framesLag = lag.topics[lag.frames_topic];
  value.textContent = framesLag === undefined ? "–" : String(framesLag);
  const parts = Object.entries(lag.topics).map(([topic, count]) => topic + ": " + count);
  detail.textContent = (parts.length ? parts.join(", ") : "topics not created yet") + " (group " + lag.group + ")";
}

// --- per-line defect rate ----------------------------------------------------

function renderDefectRates(summary) {
  const container = document.getElementById("defect-rate-chart");
  container.replaceChildren();
  const rows = summary.defect_rates;
  if (!rows.length) {
    container.textContent = "No results yet in this window.";
    return;
  }
  const { width, rowHeight, labelWidth, valueWidth } = BAR_CHART;
  const height = rows.length * rowHeight + 8;
  const barSpace = width - labelWidth - valueWidth;
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" }, container);
  svg.setAttribute("aria-label", "predicted defect rate per line");

  rows.forEach((row, index) => {
    const y = 4 + index * rowHeight;
    svgElement("text", { x: 0, y: y + rowHeight / 2 + 4, class: "axis-label" }, svg).textContent = row.line_id;
    svgElement("rect", { x: labelWidth, y: y + 3, width: barSpace, height: rowHeight - 6, class: "grid", fill: "none" }, svg);
    const bar = svgElement("rect", {
      x: labelWidth,
      y: y + 3,
      width: Math.max(row.defect_rate * barSpace, 1),
      height: rowHeight - 6,
      class: "bar",
      "data-line": row.line_id,
    }, svg);
    const text = `${percent(row.defect_rate)} (${row.predicted_defects} of ${row.frames})`;
    addTitle(bar, `${row.line_id}: ${text} frames flagged`);
    const label = svgElement("text", { x: labelWidth + barSpace + 8, y: y + rowHeight / 2 + 4, class: "bar-label", "data-line": row.line_id }, svg);
    label.textContent = text;
  });
}

// --- FNR and FPR over time ---------------------------------------------------

function renderRateCharts(summary) {
  const container = document.getElementById("rate-charts");
  container.replaceChildren();
  document.getElementById("bucket-size").textContent = duration(summary.bucket_seconds);
  const windowRates = Object.fromEntries(summary.error_rates.map((row) => [row.line_id, row]));
  const firingLines = new Set(summary.firing_alerts.map((alert) => alert.line_id));

  for (const lineId of summary.lines) {
    const box = document.createElement("div");
    box.className = "rate-chart";
    box.dataset.line = lineId;
    const heading = document.createElement("h3");
    const rates = windowRates[lineId];
    heading.textContent = lineId + (rates
      ? ` — window FNR ${percent(rates.fnr)} (${rates.false_negatives} of ${rates.defects}), FPR ${percent(rates.fpr)} (${rates.false_positives} of ${rates.good})`
      : " — no labelled frames in the window");
    if (firingLines.has(lineId)) {
      const badge = document.createElement("span");
      badge.className = "firing-badge";
      badge.textContent = "FNR drift alert firing";
      heading.appendChild(badge);
    }
    box.appendChild(heading);
    const alerts = summary.alerts.filter((alert) => alert.line_id === lineId);
    box.appendChild(rateChart(summary, summary.rate_series[lineId] || [], alerts));
    container.appendChild(box);
  }
}

function rateChart(summary, points, alerts) {
  const { width, height, left, right, top, bottom } = RATE_CHART;
  const start = summary.window_start;
  const end = summary.generated_at;
  const x = (seconds) => left + ((seconds - start) / (end - start)) * (width - left - right);
  const y = (rate) => top + (1 - rate) * (height - top - bottom);
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });

  for (const rate of [0, 0.25, 0.5, 0.75, 1]) {
    svgElement("line", { x1: left, x2: width - right, y1: y(rate), y2: y(rate), class: "grid" }, svg);
    svgElement("text", { x: left - 6, y: y(rate) + 4, "text-anchor": "end", class: "axis-label" }, svg).textContent = rate * 100 + "%";
  }
  for (let tick = 0; tick <= 4; tick++) {
    const seconds = start + (tick / 4) * (end - start);
    let anchor = "middle";
    if (tick === 0) anchor = "start";
    if (tick === 4) anchor = "end";
    svgElement("text", { x: x(seconds), y: height - 8, "text-anchor": anchor, class: "axis-label" }, svg).textContent = clockTime(seconds);
  }

  const half = summary.bucket_seconds / 2;
  drawSeries(svg, points, "fnr", "FNR", "false_negatives", "defects", (point) => x(point.bucket_start + half), y);
  drawSeries(svg, points, "fpr", "FPR", "false_positives", "good", (point) => x(point.bucket_start + half), y);
  for (const alert of alerts) drawAlert(svg, alert, x(alert.raised_at), top, height - bottom);
  return svg;
}

function drawSeries(svg, points, name, label, errorsField, trialsField, xOf, y) {
  const present = points.filter((point) => point[name] !== null);
  if (!present.length) return;

  // The Wilson band: upper bounds left to right, then lower bounds right to left.
  const upper = present.map((point) => `${xOf(point)},${y(point[name + "_high"])}`);
  const lower = present.slice().reverse().map((point) => `${xOf(point)},${y(point[name + "_low"])}`);
  if (present.length > 1) {
    svgElement("polygon", { points: upper.concat(lower).join(" "), class: "band-" + name }, svg);
  }
  const path = present.map((point, index) => `${index ? "L" : "M"}${xOf(point)},${y(point[name])}`).join(" ");
  svgElement("path", { d: path, class: "series-" + name }, svg);

  for (const point of present) {
    const cx = xOf(point);
    // Each point also gets its interval as a vertical whisker, so a lone point shows its uncertainty.
    svgElement("line", { x1: cx, x2: cx, y1: y(point[name + "_low"]), y2: y(point[name + "_high"]), class: "whisker-" + name }, svg);
    const circle = svgElement("circle", { cx, cy: y(point[name]), r: 3.5, class: "point-" + name }, svg);
    addTitle(circle, `${clockTime(point.bucket_start)}: ${label} ${percent(point[name])} ` +
      `(${point[errorsField]} of ${point[trialsField]}; 95% ${percent(point[name + "_low"])} to ${percent(point[name + "_high"])})`);
  }
}

function drawAlert(svg, alert, x, top, bottom) {
  const group = svgElement("g", {
    class: "alert-marker alert-" + alert.state,
    "data-alert-id": alert.alert_id,
    "data-state": alert.state,
  }, svg);
  svgElement("line", { x1: x, x2: x, y1: top, y2: bottom, class: "alert-line" }, group);
  if (alert.state === "firing") {
    svgElement("polygon", { points: `${x - 6},${top - 10} ${x + 6},${top - 10} ${x},${top}` }, group);
  } else {
    svgElement("circle", { cx: x, cy: top - 5, r: 5 }, group);
  }
  addTitle(group, `${clockTime(alert.raised_at)} ${alert.condition} ${alert.state}: ${alert.message}`);
}

// --- latest defects and their overlays ---------------------------------------

function renderDefects(summary) {
  const defects = summary.latest_defects;
  const key = JSON.stringify(defects.map((defect) => [defect.frame_id, defect.labelled_defect]));
  if (key === lastDefectsKey) return; // keeps the buttons stable while nothing changed
  lastDefectsKey = key;

  const list = document.getElementById("latest-defects");
  list.replaceChildren();
  if (!defects.length) {
    const item = document.createElement("li");
    item.textContent = "No defects yet.";
    list.appendChild(item);
    return;
  }
  for (const defect of defects) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "defect";
    button.dataset.frameId = defect.frame_id;
    const frame = document.createElement("span");
    frame.className = "frame";
    frame.textContent = defect.frame_id;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${defect.line_id} / ${defect.camera_id} · ${clockTime(defect.inspected_at)} · ` +
      `score ${defect.image_score.toFixed(3)} (threshold ${defect.threshold.toFixed(3)}) · ${labelText(defect)}`;
    button.append(frame, meta);
    button.addEventListener("click", () => openOverlay(defect));
    item.appendChild(button);
    list.appendChild(item);
  }
}

function labelText(defect) {
  if (defect.labelled_defect === null || defect.labelled_defect === undefined) return "not labelled";
  if (!defect.labelled_defect) return "labelled good (false positive)";
  return "labelled defect" + (defect.defect_type ? ": " + defect.defect_type : "");
}

function openOverlay(defect) {
  const modal = document.getElementById("overlay-modal");
  const image = document.getElementById("overlay-image");
  const error = document.getElementById("overlay-error");
  document.getElementById("overlay-title").textContent = "Anomaly map of " + defect.frame_id;
  document.getElementById("overlay-caption").textContent =
    `${defect.line_id} / ${defect.camera_id}, captured ${clockTime(defect.captured_at)}, ${labelText(defect)}`;
  error.hidden = true;
  image.hidden = false;
  image.onerror = () => {
    image.hidden = true;
    error.hidden = false;
    error.textContent = "The anomaly map could not be loaded from MinIO; the dashboard log says why.";
  };
  image.src = defect.overlay_url;
  modal.hidden = false;
  document.getElementById("overlay-close").focus();
}

function closeOverlay() {
  document.getElementById("overlay-modal").hidden = true;
}

// --- refresh loop ------------------------------------------------------------

// The summary (DuckDB) and the lag (Kafka) refresh independently, so a slow or
// unreachable Kafka never holds back the charts.
async function refreshSummary() {
  const status = document.getElementById("status");
  try {
    const summary = await fetchJson("/api/summary");
    document.getElementById("empty").hidden = summary.lines.length > 0 || summary.latest_defects.length > 0;
    renderCards(summary);
    renderDefectRates(summary);
    renderRateCharts(summary);
    renderDefects(summary);
    status.textContent = "updated " + clockTime(summary.generated_at) + ", every " + REFRESH_MS / 1000 + " s";
    status.classList.remove("stale");
    document.body.dataset.loaded = "true";
  } catch (error) {
    status.textContent = "refresh failed (" + error.message + "); showing older data, retrying";
    status.classList.add("stale");
  } finally {
    window.setTimeout(refreshSummary, REFRESH_MS);
  }
}

async function refreshLag() {
  try {
    renderLag(await fetchJson("/api/lag"));
  } catch (error) {
    renderLag({ error: "consumer lag unavailable: " + error.message, topics: {} });
  } finally {
    window.setTimeout(refreshLag, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("overlay-close").addEventListener("click", closeOverlay);
  document.getElementById("overlay-modal").addEventListener("click", (event) => {
    if (event.target.id === "overlay-modal") closeOverlay();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeOverlay();
  });
  refreshSummary();
  refreshLag();
});
