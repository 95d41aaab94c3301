// The live feed: an EventSource on /api/v1/live that keeps itself connected.

import { apiUrl } from "./api.js";

const MAX_BACKOFF_MS = 30000;

/**
 * Readings as they are stored. The browser reconnects a dropped stream on its own; when it gives
 * up (an HTTP error such as a 503, or a wrong content type) we reconnect with jittered
 * exponential backoff so a restarting server is not hit by every open tab at once.
 */
export class LiveFeed {
  /**
   * @param {{site?: string, device?: string}} filter
   * @param {{onReading: (r: object) => void, onState: (s: "connecting"|"live"|"retrying") => void,
   *          onResume?: () => void, onServerError?: (message: string) => void}} handlers
   *   onResume runs after a reconnect, to fill what was missed.
   */
  constructor(filter, handlers) {
    this.url = apiUrl("live", filter);
    this.handlers = handlers;
    this.source = null;
    this.retryTimer = null;
    this.attempt = 0;
    this.hadError = false;
  }

  start() {
    this.stop();
    this.handlers.onState("connecting");
    const source = new EventSource(this.url);
    this.source = source;
    source.onopen = () => {
      this.attempt = 0;
      this.handlers.onState("live");
      if (this.hadError) this.handlers.onResume?.();
      this.hadError = false;
    };
    source.addEventListener("reading", (event) => {
      let reading;
      try {
        reading = JSON.parse(event.data);
      } catch {
        return; // one bad event must not end the feed
      }
      this.handlers.onReading(reading);
    });
    // The server reports a problem on an open stream (the store became unreadable) as
    // `event: problem`; `error` events are the browser's own, for a failed connection.
    source.addEventListener("problem", (event) => {
      let message = String(event.data);
      try {
        message = JSON.parse(event.data).error ?? message;
      } catch {
        // plain-text data: shown as it is
      }
      this.handlers.onServerError?.(message);
    });
    source.onerror = () => {
      this.hadError = true;
      if (source.readyState === EventSource.CLOSED) {
        this.handlers.onState("retrying");
        this.scheduleRetry();
      } else {
        this.handlers.onState("connecting");
      }
    };
  }

  scheduleRetry() {
    this.source?.close();
    this.source = null;
    const ceiling = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** this.attempt);
    this.attempt += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.retryTimer = setTimeout(() => {
      this.hadError = true;
      this.start();
    }, delay);
  }

  stop() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.source?.close();
    this.source = null;
  }
}
