// The one place that talks to /api/v1 (docs/api.md). Everything else gets parsed JSON or an ApiError.

/** An API call that failed; `message` is the server's one-line `error` text when it sent one. */
export class ApiError extends Error {
  /**
   * @param {string} message
   * @param {number} status HTTP status, 0 when the server could not be reached.
   */
  constructor(message, status) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

// Relative to the page, so the dashboard also works behind a reverse proxy under a sub-path.
const API_ROOT = new URL("api/v1/", document.baseURI);

// A Pi without a real-time clock may be minutes off the browser's clock; "last seen 3 min ago"
// must use the server's idea of now. The Date header has whole-second resolution, so small
// differences are ignored.
let clockSkewMs = 0;

/** The server's current time in epoch ms, as far as the last response's Date header tells. */
export function serverNow() {
  return Date.now() + clockSkewMs;
}

function noteServerDate(header) {
  const serverMs = Date.parse(header ?? "");
  if (Number.isNaN(serverMs)) return;
  const skew = serverMs - Date.now();
  clockSkewMs = Math.abs(skew) > 5000 ? skew : 0;
}

/** The absolute URL of an API path with the given query parameters (null/undefined skipped). */
export function apiUrl(path, params = {}) {
  const url = new URL(path, API_ROOT);
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, String(value));
  }
  return url;
}

/**
 * GET an API path and return its JSON body.
 * @param {string} path e.g. "devices" or "devices/home/pi-kitchen"
 * @param {Record<string, unknown>} [params]
 * @param {{signal?: AbortSignal}} [options]
 * @throws {ApiError} on a network failure or a non-2xx status; AbortError is passed through.
 */
export async function getJSON(path, params = {}, { signal } = {}) {
  let response;
  try {
    response = await fetch(apiUrl(path, params), { signal, headers: { Accept: "application/json" } });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`Cannot reach the dashboard server at ${location.host}.`, 0);
  }
  noteServerDate(response.headers.get("Date"));
  if (response.status === 401) {
    // The login expired, or its token was revoked: back to the login form.
    location.assign(new URL("login", document.baseURI));
    throw new ApiError("Logged out.", 401);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // A proxy's HTML error page or an empty body: fall back to the status line below.
  }
  if (!response.ok) {
    const text = body?.error ?? (typeof body?.detail === "string" ? body.detail : null);
    throw new ApiError(text ?? `${response.status} ${response.statusText}`.trim(), response.status);
  }
  if (body === null) throw new ApiError(`The server sent no JSON for ${path}.`, response.status);
  return body;
}

/** Show who is logged in and the logout button, when the dashboard requires a login. */
export async function showSession() {
  let session;
  try {
    const response = await fetch(new URL("session", document.baseURI), { headers: { Accept: "application/json" } });
    if (!response.ok) return;
    session = await response.json();
  } catch {
    return; // the views report an unreachable server themselves
  }
  if (!session.auth) return;
  document.getElementById("user").textContent = session.user ?? "";
  document.getElementById("logout").hidden = false;
}

/** Encode one path segment (site and device names may contain anything but "/"). */
export function seg(value) {
  return encodeURIComponent(value);
}
