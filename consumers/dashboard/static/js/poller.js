// Run an async task every `intervalMs`, one at a time, and not while the tab is hidden:
// a Pi serving a forgotten background tab should not keep querying its store.

export class Poller {
  /**
   * @param {() => Promise<void>} task
   * @param {number} intervalMs
   */
  constructor(task, intervalMs) {
    this.task = task;
    this.intervalMs = intervalMs;
    this.timer = null;
    this.running = false;
    this.stopped = true;
    this.onVisibility = () => {
      if (!document.hidden && !this.stopped && !this.running) this.runNow();
    };
  }

  start() {
    this.stopped = false;
    document.addEventListener("visibilitychange", this.onVisibility);
    this.runNow();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    document.removeEventListener("visibilitychange", this.onVisibility);
  }

  async runNow() {
    clearTimeout(this.timer);
    if (this.running) return;
    this.running = true;
    try {
      await this.task();
    } catch (err) {
      console.error("poll failed", err);
    } finally {
      this.running = false;
      if (!this.stopped && !document.hidden) {
        this.timer = setTimeout(() => this.runNow(), this.intervalMs);
      }
    }
  }
}
