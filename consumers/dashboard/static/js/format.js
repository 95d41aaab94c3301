// Formatting for people: times, counts, percentages, units.

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const integer = new Intl.NumberFormat();

/** "2 Nov 2026, 08:15:02" in the browser's locale and time zone; "—" for null. */
export function absTime(ms) {
  return ms === null || ms === undefined ? "—" : dateTime.format(new Date(ms));
}

/** Today's times without the date, older ones with it. */
export function shortTime(ms, now) {
  if (ms === null || ms === undefined) return "—";
  return now - ms < 20 * 3600e3 && new Date(ms).getDate() === new Date(now).getDate()
    ? timeOnly.format(new Date(ms))
    : dateTime.format(new Date(ms));
}

/** "just now", "42 s ago", "5 min ago", "3 h ago", "12 d ago"; "never" for null. */
export function relTime(ms, now) {
  if (ms === null || ms === undefined) return "never";
  const s = Math.round((now - ms) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** Thousands separators; "—" for null. */
export function count(n) {
  return n === null || n === undefined ? "—" : integer.format(n);
}

/** Milliseconds as "850 ms", "2.4 s", "3.5 min", "2.1 h"; "—" for null. */
export function duration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60e3) return `${+(ms / 1000).toFixed(1)} s`;
  if (ms < 3600e3) return `${+(ms / 60e3).toFixed(1)} min`;
  return `${+(ms / 3600e3).toFixed(1)} h`;
}

/** A 0..1 share as a percentage; two decimals near 100 %, where the difference matters. */
export function percent(x) {
  if (x === null || x === undefined) return "—";
  const p = x * 100;
  const digits = p >= 99 && p < 100 ? 2 : p === 100 ? 0 : 1;
  return `${p.toFixed(digits)} %`;
}

// SenML unit names (what the edge agent sends) to what people read on an axis.
const UNIT_LABELS = {
  Cel: "°C",
  degC: "°C",
  degF: "°F",
  "%RH": "% RH",
  "/": "ratio",
  Pa: "Pa",
  hPa: "hPa",
  lx: "lx",
  V: "V",
  A: "A",
  W: "W",
  Wh: "Wh",
  dBm: "dBm",
  ppm: "ppm",
  s: "s",
};

/** The unit as shown on an axis, or "" when there is none. */
export function unitLabel(unit) {
  if (!unit) return "";
  return UNIT_LABELS[unit] ?? unit;
}

/** A reading value for a table cell or legend. */
export function value(v, unit = "") {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") {
    const abs = Math.abs(v);
    const text = abs !== 0 && (abs < 0.01 || abs >= 1e6) ? v.toPrecision(3) : String(+v.toFixed(2));
    return unit ? `${text} ${unit}` : text;
  }
  return String(v);
}

/** A Date as the value of an <input type="datetime-local"> (local time, minutes). */
export function toLocalInput(ms) {
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
