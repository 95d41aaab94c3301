// Entry point: hash routing between the fleet overview and a device view.

import { showSession } from "./api.js";
import { h } from "./dom.js";
import { DeviceView } from "./device.js";
import { FleetView } from "./fleet.js";
import { parseHash } from "./routes.js";

const root = document.getElementById("view");
const crumbs = document.getElementById("crumbs");
let current = null; // {route, view}

function sameDevice(a, b) {
  return a.name === "device" && b.name === "device" && a.site === b.site && a.device === b.device;
}

function renderCrumbs(route) {
  const items = [h("li", {}, route.name === "fleet" ? h("span", { "aria-current": "page" }, "Fleet") : h("a", { href: "#/" }, "Fleet"))];
  if (route.name === "device") {
    items.push(h("li", {}, route.site), h("li", {}, h("span", { "aria-current": "page" }, route.device)));
  }
  crumbs.replaceChildren(...items);
}

function route() {
  const next = parseHash();
  if (current && (sameDevice(current.route, next) || (current.route.name === "fleet" && next.name === "fleet"))) {
    current.route = next;
    current.view.update(next);
    return;
  }
  current?.view.destroy();
  const view = next.name === "device" ? new DeviceView(root, next) : new FleetView(root);
  current = { route: next, view };
  renderCrumbs(next);
  view.mount();
  window.scrollTo(0, 0);
}

if (typeof window.uPlot === "undefined") {
  const banner = document.getElementById("error");
  banner.replaceChildren(h("p", {}, h("strong", {}, "Page incomplete: "), "vendor/uplot/uPlot.iife.min.js did not load."));
  banner.hidden = false;
}
window.addEventListener("hashchange", route);
route();
showSession();
