// Hash routes: #/ (fleet) and #/device/{site}/{device}?range=24h (device view).
// The time range lives in the hash so a view can be bookmarked, shared, or loaded by a test:
//   ?range=1h|24h|7d|30d                      a window ending now (live)
//   ?range=custom&from=<ms>&to=<ms>           a fixed window
//   &zoom=<from ms>-<to ms>                   a drag-zoom inside either; "Reset zoom" drops it

export const PRESETS = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };
export const DEFAULT_RANGE = "1h";

/** @returns {{name: "fleet"} | {name: "device", site: string, device: string, params: URLSearchParams}} */
export function parseHash(hash = location.hash) {
  const raw = hash.replace(/^#/, "") || "/";
  const q = raw.indexOf("?");
  const path = q === -1 ? raw : raw.slice(0, q);
  const params = new URLSearchParams(q === -1 ? "" : raw.slice(q + 1));
  let parts;
  try {
    parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  } catch {
    parts = [];
  }
  if (parts[0] === "device" && parts.length === 3) {
    return { name: "device", site: parts[1], device: parts[2], params };
  }
  return { name: "fleet", params };
}

/** The hash of a device view, with an optional range query. */
export function deviceHref(site, device, params = null) {
  const query = params && [...params.keys()].length ? `?${params}` : "";
  return `#/device/${encodeURIComponent(site)}/${encodeURIComponent(device)}${query}`;
}

/**
 * What the range part of the hash asks for.
 * @returns {{range: string, live: boolean, span: number, zoomed: boolean,
 *            query: {from: string|number, to?: number}}} query = from/to for the series API
 */
export function resolveRange(params) {
  let range = params.get("range") ?? DEFAULT_RANGE;
  let query;
  let span;
  const from = Number(params.get("from"));
  const to = Number(params.get("to"));
  if (range === "custom" && from > 0 && to > from) {
    query = { from, to };
    span = to - from;
  } else {
    if (!(range in PRESETS)) range = DEFAULT_RANGE;
    // Relative, so the server's clock decides what "now" is (a Pi may have no RTC).
    query = { from: `-${range}` };
    span = PRESETS[range];
  }
  const zoom = /^(\d+)-(\d+)$/.exec(params.get("zoom") ?? "");
  const zoomed = Boolean(zoom && Number(zoom[2]) > Number(zoom[1]));
  if (zoomed) {
    query = { from: Number(zoom[1]), to: Number(zoom[2]) };
    span = query.to - query.from;
  }
  return { range, live: range !== "custom" && !zoomed, span, zoomed, query };
}
