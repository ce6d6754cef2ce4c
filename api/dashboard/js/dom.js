// Building DOM nodes without parsing HTML: text from the API (job names, errors, logs) is always
// set as text, so nothing it holds can become markup.

/** h("a", {href: "#/jobs", class: "x", onclick: fn}, "text", child) -> element */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key in el && typeof value !== "string") {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? "" : value);
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

export function shortId(id) {
  return id ? id.slice(0, 8) : "";
}

export function percent(value, digits = 1) {
  return typeof value === "number" ? (100 * value).toFixed(digits) : "–";
}

export function number(value, digits = 3) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
  return value.toFixed(digits);
}

export function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  const hours = Math.floor(m / 60);
  return `${hours}h ${String(m % 60).padStart(2, "0")}m`;
}

export function since(iso, now = Date.now()) {
  if (!iso) return "–";
  return `${duration((now - Date.parse(iso)) / 1000)} ago`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

export function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

export function stateBadge(state) {
  return h("span", { class: `badge state-${state}`, dataset: { state } }, state);
}

export function progressBar(fraction, label) {
  const pct = Math.max(0, Math.min(100, fraction));
  return h(
    "div",
    { class: "progress", role: "progressbar", "aria-valuenow": String(pct), "aria-valuemin": "0", "aria-valuemax": "100" },
    h("div", { class: "progress-fill", dataset: { pct: String(pct) } }),
    h("span", { class: "progress-label" }, label ?? `${pct.toFixed(0)}%`),
  );
}

/** Size a progress bar's fill through the CSSOM (a style attribute would break the CSP). */
export function sizeBars(root) {
  for (const fill of root.querySelectorAll(".progress-fill")) {
    fill.style.width = `${fill.dataset.pct}%`;
  }
}

export function emptyState(title, ...lines) {
  return h("div", { class: "empty" }, h("h3", {}, title), ...lines.map((l) => h("p", {}, l)));
}

export function errorBox(message) {
  return h("div", { class: "error", role: "alert" }, message);
}

export function code(text) {
  return h("code", {}, text);
}
