// Fleet overview (#/): every device, grouped by site, refreshed every 10 s.

import { getJSON, serverNow } from "./api.js";
import { setError } from "./banner.js";
import { h, skeleton, stateBadge } from "./dom.js";
import { absTime, count, duration, percent, relTime } from "./format.js";
import { Poller } from "./poller.js";
import { deviceHref } from "./routes.js";

const REFRESH_MS = 10000;
const COLUMNS = ["Device", "State", "Last seen", "Messages", "Gaps", "Completeness", "Stored & confirmed"];

export class FleetView {
  constructor(root) {
    this.root = root;
    this.loaded = false;
    this.abort = new AbortController(); // aborted on destroy: a late answer must not paint another view
    this.poller = new Poller(() => this.refresh(), REFRESH_MS);
  }

  mount() {
    document.title = "Fleet — iotpipe";
    this.root.replaceChildren(
      h("h1", {}, "Fleet"),
      h("section", { class: "site", "aria-label": "Loading devices" },
        skeleton("skeleton-title"),
        ...Array.from({ length: 4 }, () => skeleton("skeleton-row")),
      ),
    );
    this.root.setAttribute("aria-busy", "true");
    this.poller.start();
  }

  update() {
    this.poller.runNow();
  }

  destroy() {
    this.poller.stop();
    this.abort.abort();
    setError("fleet", null);
  }

  async refresh() {
    let body;
    try {
      body = await getJSON("devices", {}, { signal: this.abort.signal });
      setError("fleet", null);
    } catch (err) {
      if (err.name === "AbortError") return;
      setError("fleet", err);
      if (!this.loaded) {
        this.root.replaceChildren(
          h("h1", {}, "Fleet"),
          h("p", { class: "muted" }, "Nothing to show until the server answers. Retrying every 10 s."),
        );
        this.root.setAttribute("aria-busy", "false");
      }
      return;
    }
    this.loaded = true;
    this.root.setAttribute("aria-busy", "false");
    this.render(body.devices ?? []);
  }

  render(devices) {
    const now = serverNow();
    const updated = h("p", { class: "muted small", title: absTime(now) }, "Updated every 10 s");
    if (devices.length === 0) {
      this.root.replaceChildren(h("h1", {}, "Fleet"), emptyFleet());
      return;
    }
    const bySite = new Map();
    for (const d of devices) {
      if (!bySite.has(d.site)) bySite.set(d.site, []);
      bySite.get(d.site).push(d);
    }
    const sites = [...bySite.keys()].sort((a, b) => a.localeCompare(b));
    const online = devices.filter((d) => d.state === "online").length;
    this.root.replaceChildren(
      h("div", { class: "page-head" },
        h("h1", {}, "Fleet"),
        h("p", { class: "muted" },
          `${devices.length} device${devices.length === 1 ? "" : "s"} · ${online} online · ${sites.length} site${sites.length === 1 ? "" : "s"}`),
      ),
      ...sites.map((site) => siteSection(site, bySite.get(site), now)),
      updated,
    );
  }
}

function emptyFleet() {
  return h("section", { class: "empty", "data-testid": "empty" },
    h("h2", {}, "No devices yet"),
    h("p", {}, "Start ", h("code", {}, "iotpipe consume"), " (or ", h("code", {}, "make run"),
      ") and devices appear here with their first stored message."),
  );
}

function siteSection(site, devices, now) {
  devices.sort((a, b) => a.device.localeCompare(b.device));
  const online = devices.filter((d) => d.state === "online").length;
  const headingId = `site-${site.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  return h("section", { class: "site", "aria-labelledby": headingId },
    h("div", { class: "site-head" },
      h("h2", { id: headingId }, site),
      h("span", { class: "muted" }, `${devices.length} device${devices.length === 1 ? "" : "s"}, ${online} online`),
    ),
    h("table", { class: "devices" },
      h("thead", {}, h("tr", {}, COLUMNS.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, devices.map((d) => deviceRow(d, now))),
    ),
  );
}

function deviceRow(d, now) {
  const href = deviceHref(d.site, d.device);
  const row = h("tr", { "data-testid": "device-row", dataset: { site: d.site, device: d.device } },
    h("th", { scope: "row", "data-label": "Device" },
      h("a", { href }, d.device),
      d.agent ? h("span", { class: "agent" }, d.agent) : null,
    ),
    h("td", { "data-label": "State" }, stateBadge(d.state)),
    h("td", { "data-label": "Last seen" }, h("time", {
      datetime: d.last_seen_ms ? new Date(d.last_seen_ms).toISOString() : null,
      title: absTime(d.last_seen_ms),
    }, relTime(d.last_seen_ms, now))),
    h("td", { class: "num", "data-label": "Messages" }, count(d.messages)),
    h("td", { class: `num${d.gaps ? " warn" : ""}`, "data-label": "Gaps" }, count(d.gaps)),
    h("td", { class: "num", "data-label": "Completeness" }, percent(d.completeness)),
    confirmedCell(d),
  );
  // The whole row is a target for the mouse; the link stays the keyboard and screen-reader way in.
  row.addEventListener("click", (event) => {
    if (event.target.closest("a") || window.getSelection()?.toString()) return;
    location.hash = href;
  });
  return row;
}

// Time from reading to stored-and-confirmed (the receipt RabbitMQ confirmed): p50 / p99.
function confirmedCell(d) {
  const c = d.confirmed_latency_ms;
  if (!c) {
    return h("td", { class: "num muted", "data-label": "Stored & confirmed", "data-testid": "confirmed",
      title: "No receipt confirmed for this device (receipts off, or none yet)" }, "—");
  }
  const title = `p50 ${duration(c.p50)}, p99 ${duration(c.p99)}, last ${duration(c.last)} ` +
    `over ${count(c.envelopes)} envelopes; last confirmed ${absTime(d.last_confirmed_ms)}`;
  return h("td", { class: "num", "data-label": "Stored & confirmed", "data-testid": "confirmed", title },
    `${duration(c.p50)} / ${duration(c.p99)}`);
}
