// Building DOM without innerHTML: device, sensor and agent names come from the field.

/**
 * Create an element. `attrs`: `class`, `dataset` (object), `on<event>` (listener), anything else
 * as an attribute (true means present, null/false means absent). Children: nodes or strings.
 * @returns {HTMLElement}
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

/** A state badge: online, offline, or unknown (no status message seen yet). */
export function stateBadge(state) {
  const known = state === "online" || state === "offline";
  const name = known ? state : "unknown";
  return h("span", { class: `badge badge-${name}`, dataset: { state: name } }, name);
}

/** A pulsing placeholder block while something loads. */
export function skeleton(className = "") {
  return h("div", { class: `skeleton ${className}`.trim(), "aria-hidden": "true" });
}
