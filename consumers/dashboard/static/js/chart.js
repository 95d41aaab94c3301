// One sensor's chart: uPlot with a min–max band and a mean line, gaps drawn as gaps.
/* global uPlot */

import { h } from "./dom.js";
import { absTime, unitLabel, value as formatValue } from "./format.js";

/**
 * Series points (docs/api.md) to uPlot columns [x s, max, mean, min]. A null row is inserted
 * after a point whose successor starts more than one bucket later, so the line breaks there.
 * @param {{t: number, min: number, mean: number, max: number}[]} points oldest first
 * @param {number} bucketMs
 * @returns {{data: (number|null)[][], drawn: number}} drawn = points with a value
 */
/** The spacing above which two neighbouring points are a gap, not just a device reporting less
 * often than the bucket width: twice the usual (median) spacing, and at least two buckets. */
function gapThreshold(points, bucketMs) {
  const steps = [];
  for (let i = 1; i < points.length; i += 1) steps.push(points[i].t - points[i - 1].t);
  if (steps.length === 0) return 2 * bucketMs;
  steps.sort((a, b) => a - b);
  const median = steps[Math.floor(steps.length / 2)];
  return Math.max(2 * bucketMs, 2 * median);
}

export function toColumns(points, bucketMs) {
  const xs = [];
  const maxs = [];
  const means = [];
  const mins = [];
  const threshold = gapThreshold(points, bucketMs);
  let drawn = 0;
  let prev = null;
  for (const p of points) {
    if (prev && p.t - prev.t > threshold) {
      xs.push((prev.t + bucketMs) / 1000);
      maxs.push(null);
      means.push(null);
      mins.push(null);
    }
    xs.push(p.t / 1000);
    maxs.push(p.max ?? null);
    means.push(p.mean ?? null);
    mins.push(p.min ?? null);
    if (p.mean !== null && p.mean !== undefined) drawn += 1;
    prev = p;
  }
  return { data: [xs, maxs, means, mins], drawn };
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function chartHeight() {
  return window.matchMedia("(max-width: 600px)").matches ? 180 : 220;
}

export class SensorChart {
  /**
   * @param {{sensor: string, kind: "number"|"boolean", unit: string|null}} sensor
   * @param {{syncKey: string, onZoom: (fromMs: number, toMs: number) => void, onReset: () => void}} hooks
   */
  constructor(sensor, hooks) {
    this.sensor = sensor.sensor;
    this.kind = sensor.kind;
    this.unit = unitLabel(sensor.unit);
    this.hooks = hooks;
    this.points = [];
    this.bucketMs = 1000;
    this.window = { from: 0, to: 0 };
    this.plot = null;
    this.dirty = false;

    this.plotBox = h("div", { class: "plot" });
    this.emptyNote = h("p", { class: "chart-note", hidden: true }, "No data in this range");
    this.caption = h("span", { class: "chart-meta" });
    this.element = h(
      "figure",
      {
        class: "chart is-loading",
        dataset: { testid: "chart", sensor: this.sensor, kind: this.kind },
        "aria-busy": "true",
      },
      h("figcaption", {}, h("span", { class: "chart-title" }, this.sensor), this.caption),
      h("div", { class: "plot-wrap" }, this.plotBox, this.emptyNote),
    );
    this.resizeObserver = new ResizeObserver(() => this.resize());
    this.resizeObserver.observe(this.plotBox);
  }

  /** Start of a new fetch: keep what is drawn, show a thin progress bar. */
  setLoading(loading) {
    this.element.classList.toggle("is-loading", loading);
    this.element.setAttribute("aria-busy", String(loading));
  }

  /** The width to ask the server for, in points: about one per pixel. */
  pointsWanted() {
    const width = this.plotBox.clientWidth || 600;
    return Math.max(10, Math.min(5000, Math.round(width)));
  }

  /** Replace the data with a series response (docs/api.md, GET /api/v1/series). */
  setSeries(series) {
    this.points = series.points.map((p) => ({ ...p }));
    this.bucketMs = series.bucket_ms;
    this.window = { from: series.from_ms, to: series.to_ms };
    this.setLoading(false);
    this.render();
  }

  /** Move the visible window (live mode slides it forward) and drop points that left it. */
  setWindow(from, to) {
    this.window = { from, to };
    const firstKept = this.points.findIndex((p) => p.t + this.bucketMs > from);
    if (firstKept > 0) this.points.splice(0, firstKept);
    else if (firstKept === -1) this.points = [];
    this.scheduleRender();
  }

  /** Fold one live reading into the last bucket, or open a new one on the server's bucket grid. */
  addReading(t, v) {
    const y = typeof v === "boolean" ? Number(v) : v;
    if (typeof y !== "number" || !Number.isFinite(y)) return;
    const last = this.points.at(-1);
    if (last && t < last.t) return; // late reading: the next refetch places it
    if (last && t < last.t + this.bucketMs) {
      const n = last.n ?? 1;
      last.min = Math.min(last.min, y);
      last.max = Math.max(last.max, y);
      last.mean = (last.mean * n + y) / (n + 1);
      last.n = n + 1;
    } else {
      const start = last ? last.t + Math.floor((t - last.t) / this.bucketMs) * this.bucketMs : t;
      this.points.push({ t: start, min: y, mean: y, max: y, n: 1 });
    }
    if (t > this.window.to) this.setWindow(t - (this.window.to - this.window.from), t);
    this.scheduleRender();
  }

  scheduleRender() {
    if (this.dirty) return;
    this.dirty = true;
    requestAnimationFrame(() => {
      this.dirty = false;
      this.render();
    });
  }

  render() {
    const { data, drawn } = toColumns(this.points, this.bucketMs);
    const columns = this.kind === "boolean" ? [data[0], data[2]] : data;
    if (this.plot) {
      this.plot.setData(columns);
    } else {
      this.plot = new uPlot(this.options(), columns, this.plotBox);
    }
    this.emptyNote.hidden = drawn > 0;
    this.element.dataset.points = String(drawn);
    this.caption.textContent = `${drawn} point${drawn === 1 ? "" : "s"} · ${bucketText(this.bucketMs)} buckets`;
  }

  /** Rebuild with the current theme colours (prefers-color-scheme changed). */
  restyle() {
    this.plot?.destroy();
    this.plot = null;
    if (this.element.dataset.points !== undefined) this.render();
  }

  resize() {
    if (!this.plot) return;
    const width = this.plotBox.clientWidth;
    const height = chartHeight();
    if (width > 0 && (width !== this.plot.width || height !== this.plot.height)) {
      this.plot.setSize({ width, height });
    }
  }

  destroy() {
    this.resizeObserver.disconnect();
    this.plot?.destroy();
    this.plot = null;
  }

  options() {
    const accent = cssVar("--accent");
    const muted = cssVar("--muted");
    const grid = cssVar("--grid");
    const font = `12px ${cssVar("--font-family") || "system-ui, sans-serif"}`;
    const axis = {
      stroke: muted,
      font,
      labelFont: font,
      grid: { stroke: grid, width: 1 },
      ticks: { stroke: grid, width: 1, size: 4 },
    };
    const isBool = this.kind === "boolean";
    const unit = this.unit;
    const legendValue = (_u, v) => (v === null || v === undefined ? "—" : formatValue(v, isBool ? "" : unit));

    const series = [{ label: "time", value: (_u, ts) => (ts === null ? "—" : absTime(ts * 1000)) }];
    if (isBool) {
      series.push({
        label: "share true",
        stroke: accent,
        width: 2,
        fill: cssVar("--accent-fill"),
        spanGaps: false,
        paths: uPlot.paths.stepped({ align: 1 }),
        value: (_u, v) => (v === null || v === undefined ? "—" : `${Math.round(v * 100)} %`),
      });
    } else {
      const bandStroke = cssVar("--band-stroke");
      series.push(
        { label: "max", stroke: bandStroke, width: 1, spanGaps: false, value: legendValue, points: { show: false } },
        { label: "mean", stroke: accent, width: 2, spanGaps: false, value: legendValue },
        { label: "min", stroke: bandStroke, width: 1, spanGaps: false, value: legendValue, points: { show: false } },
      );
    }

    const yAxis = {
      ...axis,
      label: isBool ? `${this.sensor} (share true)` : unit ? `${this.sensor} (${unit})` : this.sensor,
      labelSize: 22,
      size: isBool ? 56 : 60,
    };
    if (isBool) {
      yAxis.splits = () => [0, 0.5, 1];
      yAxis.values = (_u, splits) => splits.map((v) => (v === 0 ? "false" : v === 1 ? "true" : "50 %"));
    }

    return {
      width: this.plotBox.clientWidth || 600,
      height: chartHeight(),
      pxAlign: 0,
      cursor: {
        sync: { key: this.hooks.syncKey },
        drag: { x: true, y: false, setScale: false },
      },
      scales: {
        // The x range is the requested window, not the data's extent: an empty start is visible.
        x: { time: true, range: () => [this.window.from / 1000, this.window.to / 1000] },
        y: isBool ? { range: [-0.05, 1.05] } : { range: (_u, min, max) => padRange(min, max) },
      },
      series,
      bands: isBool ? [] : [{ series: [1, 3], fill: cssVar("--accent-fill") }],
      axes: [axis, yAxis],
      legend: { show: true, live: true },
      hooks: {
        setSelect: [
          (u) => {
            if (u.select.width < 4) return;
            const from = u.posToVal(u.select.left, "x") * 1000;
            const to = u.posToVal(u.select.left + u.select.width, "x") * 1000;
            u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
            this.hooks.onZoom(Math.round(from), Math.round(to));
          },
        ],
        ready: [
          (u) => {
            u.over.addEventListener("dblclick", () => this.hooks.onReset());
          },
        ],
      },
    };
  }
}

function padRange(min, max) {
  if (min === null || max === null) return [0, 1];
  if (min === max) {
    const pad = Math.abs(min) * 0.05 || 1;
    return [min - pad, max + pad];
  }
  const pad = (max - min) * 0.08;
  return [min - pad, max + pad];
}

function bucketText(ms) {
  if (ms % 86400000 === 0) return `${ms / 86400000} d`;
  if (ms % 3600000 === 0) return `${ms / 3600000} h`;
  if (ms % 60000 === 0) return `${ms / 60000} min`;
  if (ms % 1000 === 0) return `${ms / 1000} s`;
  return `${ms} ms`;
}
