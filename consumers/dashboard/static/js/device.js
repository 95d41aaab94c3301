// Device view (#/device/{site}/{device}): header, one chart per sensor, live updates.

import { getJSON, seg, serverNow } from "./api.js";
import { clearErrors, setError } from "./banner.js";
import { SensorChart } from "./chart.js";
import { h, skeleton, stateBadge } from "./dom.js";
import { absTime, count, percent, relTime, shortTime, toLocalInput, value as formatValue, unitLabel } from "./format.js";
import { LiveFeed } from "./live.js";
import { Poller } from "./poller.js";
import { PRESETS, deviceHref, resolveRange } from "./routes.js";

const REFRESH_MS = 10000;
const STRING_ROWS = 10;
const LIVE_TEXT = { live: "Live", connecting: "Connecting…", retrying: "Reconnecting…", paused: "Paused" };

export class DeviceView {
  constructor(root, route) {
    this.root = root;
    this.site = route.site;
    this.device = route.device;
    this.params = route.params;
    this.range = resolveRange(this.params);
    this.info = null;
    this.sensorKey = "";
    this.charts = new Map(); // sensor -> SensorChart
    this.tables = new Map(); // sensor -> {body: HTMLElement, unit: string}
    this.seriesAbort = null;
    this.abort = new AbortController(); // aborted on destroy: a late answer must not paint another view
    this.feed = null;
    this.header = h("div", { class: "device-head" });
    this.chartGrid = h("div", { class: "charts" });
    this.stringBox = h("div", { class: "strings" });
    this.liveBadge = h("span", { class: "live", "data-testid": "live", role: "status" });
    this.poller = new Poller(() => this.refreshInfo(), REFRESH_MS);
    this.scheme = window.matchMedia("(prefers-color-scheme: dark)");
    this.onScheme = () => this.charts.forEach((c) => c.restyle());
  }

  mount() {
    document.title = `${this.device} · ${this.site} — iotpipe`;
    this.header.replaceChildren(h("h1", {}, this.device), skeleton("skeleton-line"));
    this.chartGrid.replaceChildren(skeleton("skeleton-chart"), skeleton("skeleton-chart"));
    this.root.replaceChildren(this.header, this.toolbar(), this.chartGrid, this.stringBox);
    this.root.setAttribute("aria-busy", "true");
    this.scheme.addEventListener("change", this.onScheme);
    this.syncControls();
    this.poller.start();
  }

  /** Same device, new hash: only the range may have changed. */
  update(route) {
    this.params = route.params;
    this.range = resolveRange(this.params);
    this.syncControls();
    if (this.info) this.loadSeries();
  }

  destroy() {
    this.poller.stop();
    this.feed?.stop();
    this.seriesAbort?.abort();
    this.abort.abort();
    this.scheme.removeEventListener("change", this.onScheme);
    this.charts.forEach((c) => c.destroy());
    clearErrors("device");
  }

  // ---- data -------------------------------------------------------------------------------

  async refreshInfo() {
    let info;
    try {
      info = await getJSON(`devices/${seg(this.site)}/${seg(this.device)}`, {}, { signal: this.abort.signal });
      setError("device", null);
    } catch (err) {
      if (err.name === "AbortError") return;
      setError("device", err);
      if (!this.info) {
        this.header.replaceChildren(h("h1", {}, this.device),
          h("p", { class: "muted" }, h("a", { href: "#/" }, "Back to the fleet")));
        this.chartGrid.replaceChildren();
        this.root.setAttribute("aria-busy", "false");
      }
      return;
    }
    const first = !this.info;
    this.info = info;
    this.toolbarEl.hidden = false;
    this.renderHeader();
    const sensors = info.sensor_list ?? [];
    const key = sensors.map((s) => `${s.sensor}:${s.kind}`).join("|");
    if (first || key !== this.sensorKey) {
      this.sensorKey = key;
      this.buildCharts(sensors);
      this.root.setAttribute("aria-busy", "false");
      this.loadSeries();
    } else if (this.range.live) {
      this.slideWindows();
    }
  }

  /** Fetch every chart's series for the current range; aborts a fetch still running. */
  async loadSeries() {
    this.seriesAbort?.abort();
    if (this.abort.signal.aborted) return;
    const abort = new AbortController();
    this.seriesAbort = abort;
    this.updateLive();
    const base = { site: this.site, device: this.device, ...this.range.query };
    const chartLoads = [...this.charts.values()].map(async (chart) => {
      chart.setLoading(true);
      try {
        const series = await getJSON("series", { ...base, sensor: chart.sensor, points: chart.pointsWanted() },
          { signal: abort.signal });
        chart.setSeries(series);
        setError(`device:${chart.sensor}`, null);
      } catch (err) {
        if (err.name === "AbortError") return;
        chart.setLoading(false);
        setError(`device:${chart.sensor}`, err);
      }
    });
    const tableLoads = [...this.tables.entries()].map(async ([sensor, table]) => {
      try {
        const series = await getJSON("series", { ...base, sensor, points: STRING_ROWS }, { signal: abort.signal });
        this.fillTable(table, series.points);
        setError(`device:${sensor}`, null);
      } catch (err) {
        if (err.name === "AbortError") return;
        table.body.replaceChildren();
        setError(`device:${sensor}`, err);
      }
    });
    await Promise.all([...chartLoads, ...tableLoads]);
  }

  /** Live mode: keep each chart's window ending at the server's now, even without new readings. */
  slideWindows() {
    const to = serverNow();
    this.charts.forEach((c) => c.setWindow(to - this.range.span, to));
  }

  onReading(reading) {
    if (reading.site !== this.site || reading.device !== this.device) return;
    const chart = this.charts.get(reading.sensor);
    if (chart) {
      chart.addReading(reading.t, reading.value);
      return;
    }
    const table = this.tables.get(reading.sensor);
    if (table) {
      table.body.prepend(stringRow({ t: reading.t, value: reading.value }, table.unit));
      while (table.body.rows.length > STRING_ROWS) table.body.lastElementChild.remove();
      table.empty.hidden = true;
    }
  }

  updateLive() {
    if (!this.range.live) {
      this.feed?.stop();
      this.feed = null;
      this.setLiveState("paused");
      return;
    }
    if (this.feed) return;
    this.feed = new LiveFeed({ site: this.site, device: this.device }, {
      onReading: (r) => this.onReading(r),
      onState: (s) => {
        this.setLiveState(s);
        if (s === "live") setError("device:live", null);
      },
      onServerError: (message) => setError("device:live", { message, status: 503 }),
      onResume: () => this.loadSeries(), // fill what arrived while disconnected
    });
    this.feed.start();
  }

  setLiveState(state) {
    this.liveBadge.dataset.state = state;
    this.liveBadge.textContent = LIVE_TEXT[state];
    this.liveBadge.title = state === "paused"
      ? "Live updates run when the range ends now (a preset without zoom)."
      : "New readings are added as they are stored.";
  }

  // ---- rendering --------------------------------------------------------------------------

  renderHeader() {
    const d = this.info;
    const now = serverNow();
    const item = (label, content, title) =>
      h("div", {}, h("dt", {}, label), h("dd", { title }, content));
    this.header.replaceChildren(
      h("div", { class: "device-title" },
        h("h1", {}, d.device),
        stateBadge(d.state),
        h("span", { class: "muted" }, `site ${d.site}`),
      ),
      h("dl", { class: "facts" },
        item("Agent", d.agent ?? "—"),
        item("Last seen", relTime(d.last_seen_ms, now), absTime(d.last_seen_ms)),
        item("State since", d.state_ms ? relTime(d.state_ms, now) : "—", absTime(d.state_ms)),
        item("Completeness", percent(d.completeness)),
        item("Messages", count(d.messages)),
        item("Gaps", count(d.gaps)),
        item("Duplicates", count(d.duplicates)),
      ),
    );
  }

  buildCharts(sensors) {
    this.charts.forEach((c) => c.destroy());
    this.charts.clear();
    this.tables.clear();
    const plotted = sensors.filter((s) => s.kind === "number" || s.kind === "boolean");
    const strings = sensors.filter((s) => s.kind === "string");
    const syncKey = `${this.site}/${this.device}`;
    for (const sensor of plotted) {
      this.charts.set(sensor.sensor, new SensorChart(sensor, {
        syncKey,
        onZoom: (from, to) => this.navigate({ zoom: `${from}-${to}` }),
        onReset: () => this.range.zoomed && this.navigate({ zoom: null }),
      }));
    }
    this.chartGrid.replaceChildren(...[...this.charts.values()].map((c) => c.element));
    this.hint.hidden = this.charts.size === 0;
    if (sensors.length === 0) {
      this.chartGrid.replaceChildren(h("section", { class: "empty", "data-testid": "empty" },
        h("h2", {}, "No data yet"),
        h("p", {}, "This device has not sent any readings. Charts appear with its first reading.")));
    }
    for (const sensor of strings) {
      const body = h("tbody", {});
      const empty = h("p", { class: "muted", hidden: true }, "No data in this range");
      this.tables.set(sensor.sensor, { body, empty, unit: unitLabel(sensor.unit) });
    }
    this.stringBox.replaceChildren(...[...this.tables.entries()].map(([sensor, t]) =>
      h("section", { class: "string-sensor", "data-sensor": sensor },
        h("h2", {}, sensor),
        h("table", { class: "values" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Time"), h("th", { scope: "col" }, "Value"))),
          t.body),
        t.empty)));
  }

  fillTable(table, points) {
    const newestFirst = [...points].sort((a, b) => b.t - a.t).slice(0, STRING_ROWS);
    table.body.replaceChildren(...newestFirst.map((p) => stringRow(p, table.unit)));
    table.empty.hidden = newestFirst.length > 0;
  }

  toolbar() {
    this.presetButtons = Object.keys(PRESETS).map((range) =>
      h("button", { type: "button", class: "seg", dataset: { range }, onclick: () => this.navigate({ range, from: null, to: null, zoom: null }) }, range));
    this.customButton = h("button", {
      type: "button", class: "seg", "aria-controls": "custom-range", dataset: { range: "custom" },
      onclick: () => {
        this.customForm.hidden = !this.customForm.hidden;
        this.customButton.setAttribute("aria-expanded", String(!this.customForm.hidden));
        if (!this.customForm.hidden) this.fromInput.focus();
      },
    }, "Custom");
    this.fromInput = h("input", { type: "datetime-local", name: "from", required: true });
    this.toInput = h("input", { type: "datetime-local", name: "to", required: true });
    this.customForm = h("form", {
      id: "custom-range", class: "custom", hidden: true,
      onsubmit: (event) => {
        event.preventDefault();
        const from = new Date(this.fromInput.value).getTime();
        const to = new Date(this.toInput.value).getTime();
        if (!(to > from)) {
          this.toInput.setCustomValidity("The end must be after the start.");
          this.toInput.reportValidity();
          return;
        }
        this.navigate({ range: "custom", from, to, zoom: null });
      },
    },
      h("label", {}, "From ", this.fromInput),
      h("label", {}, "To ", this.toInput),
      h("button", { type: "submit", class: "primary" }, "Apply"));
    this.toInput.addEventListener("input", () => this.toInput.setCustomValidity(""));
    this.resetButton = h("button", { type: "button", class: "reset", hidden: true, onclick: () => this.navigate({ zoom: null }) }, "Reset zoom");
    this.hint = h("p", { class: "hint muted small" }, "Drag across a chart to zoom; double-click to reset.");
    // Hidden until the device is known: no range controls for a device that failed to load.
    this.toolbarEl = h("div", { class: "toolbar", hidden: true },
      h("div", { class: "segmented", role: "group", "aria-label": "Time range" }, this.presetButtons, this.customButton),
      this.resetButton,
      this.liveBadge,
      this.customForm,
      this.hint,
    );
    return this.toolbarEl;
  }

  /** Reflect the range in the controls (the hash is the source of truth). */
  syncControls() {
    for (const button of [...this.presetButtons, this.customButton]) {
      button.setAttribute("aria-pressed", String(button.dataset.range === this.range.range));
    }
    this.resetButton.hidden = !this.range.zoomed;
    const now = serverNow();
    const from = this.range.range === "custom" ? Number(this.params.get("from")) : now - PRESETS[this.range.range];
    const to = this.range.range === "custom" ? Number(this.params.get("to")) : now;
    this.fromInput.value = toLocalInput(from);
    this.toInput.value = toLocalInput(to);
    if (this.range.range !== "custom") {
      this.customForm.hidden = true;
      this.customButton.setAttribute("aria-expanded", "false");
    }
    if (!this.range.live) this.setLiveState("paused");
  }

  /** Change range parameters through the hash, so back/forward and bookmarks work. */
  navigate(changes) {
    const params = new URLSearchParams(this.params);
    for (const [key, val] of Object.entries(changes)) {
      if (val === null) params.delete(key);
      else params.set(key, String(val));
    }
    if (params.get("range") !== "custom") {
      params.delete("from");
      params.delete("to");
    }
    location.hash = deviceHref(this.site, this.device, params);
  }
}

function stringRow(p, unit) {
  const now = serverNow();
  return h("tr", {},
    h("td", {}, h("time", { datetime: new Date(p.t).toISOString(), title: absTime(p.t) }, shortTime(p.t, now))),
    h("td", {}, formatValue(p.value, typeof p.value === "number" ? unit : "")));
}
