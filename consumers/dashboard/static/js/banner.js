// The error banner: one line per failing source (fleet poll, a chart, ...), cleared when it recovers.

import { h } from "./dom.js";

const errors = new Map();

function titleFor(status) {
  if (status === 0) return "Server unreachable";
  if (status === 503) return "Store unavailable";
  if (status === 404) return "Not found";
  if (status === 400) return "Bad request";
  return `Error ${status}`;
}

function render() {
  const banner = document.getElementById("error");
  // Identical messages from several charts (a 503 hits them all) are shown once.
  const unique = new Map();
  for (const err of errors.values()) unique.set(`${err.status}|${err.message}`, err);
  banner.replaceChildren(
    ...[...unique.values()].map((err) =>
      h("p", {}, h("strong", {}, `${titleFor(err.status)}: `), err.message),
    ),
  );
  banner.hidden = unique.size === 0;
}

/**
 * Show (or, with null, clear) the error of one source.
 * @param {string} source
 * @param {{message: string, status?: number} | null} err
 */
export function setError(source, err) {
  if (err) errors.set(source, { message: err.message, status: err.status ?? -1 });
  else if (!errors.delete(source)) return;
  render();
}

/** Clear every error whose source starts with `prefix` (all of them when omitted). */
export function clearErrors(prefix = "") {
  for (const key of [...errors.keys()]) if (key.startsWith(prefix)) errors.delete(key);
  render();
}
