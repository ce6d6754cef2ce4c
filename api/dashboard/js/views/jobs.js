// Job list: filters kept in the URL (#/jobs?state=running&method=hmkd&name=teach), newest
// first, "Load more" through the API's cursor, and a selection to compare.

import { query, request } from "../api.js";
import { code, emptyState, errorBox, h, percent, progressBar, shortId, since, sizeBars, stateBadge } from "../dom.js";
import { every } from "../poll.js";

const STATES = ["waiting", "queued", "running", "succeeded", "failed", "cancelled"];
const KINDS = ["train", "distill", "evaluate"];
let methods = null; // the server's one list of methods (GET /v1/methods), read once

function methodNames() {
  if (!methods) methods = request("/v1/methods").then((list) => list.map((m) => m.name));
  return methods;
}
const PAGE = 25;

function select(name, label, options, value) {
  return h(
    "label",
    {},
    label,
    h("select", { name }, h("option", { value: "" }, "any"), options.map((o) => h("option", { value: o, selected: o === value }, o))),
  );
}

function filtersFrom(params) {
  return {
    state: params.getAll("state").filter((s) => STATES.includes(s)),
    kind: params.get("kind") || "",
    method: params.get("method") || "",
    queue: params.get("queue") || "",
    name: params.get("name") || "",
  };
}

function filterForm(filters, onChange) {
  const form = h(
    "form",
    { class: "filters", id: "job-filters" },
    h("fieldset", { class: "states" }, h("legend", {}, "State"), STATES.map((s) => h("label", { class: "check" }, h("input", { type: "checkbox", name: "state", value: s, checked: filters.state.includes(s) }), ` ${s}`))),
    select("kind", "Kind ", KINDS, filters.kind),
    select("method", "Method ", filters.method ? [filters.method] : [], filters.method),
    h("label", {}, "Queue ", h("input", { name: "queue", value: filters.queue, size: 10, placeholder: "any" })),
    h("label", {}, "Name ", h("input", { type: "search", name: "name", value: filters.name, placeholder: "contains…" })),
  );
  methodNames()
    .then((names) => {
      const menu = form.querySelector("select[name=method]");
      const chosen = menu.value;
      menu.replaceChildren(h("option", { value: "" }, "any"), ...names.map((o) => h("option", { value: o, selected: o === chosen }, o)));
    })
    .catch(() => { methods = null; }); // tried again with the next form
  let debounce = null;
  const read = () => {
    const data = new FormData(form);
    return { state: data.getAll("state"), kind: data.get("kind"), method: data.get("method"), queue: data.get("queue").trim(), name: data.get("name").trim() };
  };
  form.addEventListener("change", () => onChange(read()));
  form.addEventListener("input", (e) => {
    if (e.target.name !== "name" && e.target.name !== "queue") return;
    clearTimeout(debounce);
    debounce = setTimeout(() => onChange(read()), 300);
  });
  form.addEventListener("submit", (e) => e.preventDefault());
  return form;
}

function metricOf(job, key) {
  const ev = job.latest_eval;
  return ev && typeof ev[key] === "number" ? percent(ev[key]) : "–";
}

function row(job, selected, onSelect) {
  const progress = job.state === "running" || job.state === "queued" || job.state === "waiting"
    ? progressBar(job.progress, job.state === "queued" ? `queued #${job.queue_position ?? "?"}` : job.state === "waiting" ? "waiting for teacher" : `${job.progress.toFixed(0)}%`)
    : h("span", { class: "muted" }, `${job.iteration}/${job.total_iterations}`);
  return h(
    "tr",
    { dataset: { jobId: job.id } },
    h("td", {}, h("input", { type: "checkbox", class: "pick", "aria-label": `select ${job.name}`, checked: selected.has(job.id), onchange: (e) => onSelect(job.id, e.target.checked) })),
    h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "job-name" }, job.name), " ", h("span", { class: "muted mono" }, shortId(job.id))),
    h("td", {}, stateBadge(job.state)),
    h("td", {}, job.kind, job.method !== "none" ? h("span", { class: "muted" }, ` · ${job.method}`) : ""),
    h("td", {}, job.queue),
    h("td", { class: "progress-cell" }, progress),
    h("td", { class: "num" }, metricOf(job, "AP")),
    h("td", { class: "num" }, metricOf(job, "AP_S")),
    h("td", { title: job.created_at }, since(job.created_at)),
  );
}

export function jobsView(root, { params }) {
  let filters = filtersFrom(params);
  let items = [];
  let cursor = null;
  const selected = new Set();
  const table = h("div", { id: "job-table" }, h("p", { class: "muted" }, "Loading jobs…"));
  const more = h("button", { type: "button", id: "load-more", hidden: true }, "Load more");
  const compare = h("button", { type: "button", id: "compare-selected", class: "primary", disabled: true }, "Compare selected");
  const status = h("div", { id: "jobs-status" });

  const hasFilters = () => filters.state.length || filters.kind || filters.method || filters.queue || filters.name;
  const apiQuery = (extra) => query({ ...filters, ...extra });

  function render() {
    compare.disabled = selected.size < 1;
    compare.textContent = `Compare selected (${selected.size})`;
    more.hidden = !cursor;
    if (!items.length) {
      table.replaceChildren(
        hasFilters()
          ? emptyState("No jobs match these filters", "Clear a filter to see more.")
          : emptyState("No jobs yet", h("span", {}, "Submit one with ", code("hmkd submit configs/service/teacher.yaml --follow"), ".")),
      );
      return;
    }
    table.replaceChildren(
      h(
        "table",
        { class: "table jobs" },
        h("thead", {}, h("tr", {}, ["", "Name", "State", "Kind", "Queue", "Progress", "AP", "AP_S", "Created"].map((t) => h("th", {}, t)))),
        h("tbody", {}, items.map((j) => row(j, selected, onSelect))),
      ),
    );
    sizeBars(table);
  }

  function onSelect(id, on) {
    if (on) selected.add(id);
    else selected.delete(id);
    render();
  }

  async function load(signal, { append = false } = {}) {
    // A refresh re-reads as many rows as are shown, so "Load more" pages stay in place.
    const limit = append ? PAGE : Math.min(200, Math.max(PAGE, items.length));
    try {
      const page = await request(`/v1/jobs${apiQuery({ limit, cursor: append ? cursor : undefined })}`, { signal });
      items = append ? items.concat(page.items) : page.items;
      cursor = page.next_cursor;
      status.replaceChildren();
      render();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      status.replaceChildren(errorBox(`Could not load jobs: ${err.message}`));
      throw err;
    }
  }

  let stopPolling = () => {};
  function restart() {
    stopPolling();
    items = [];
    cursor = null;
    stopPolling = every(5000, (signal) => load(signal));
  }

  const form = filterForm(filters, (next) => {
    filters = next;
    history.replaceState(null, "", `#/jobs${query(filters)}`);
    restart();
  });
  more.addEventListener("click", () => load(undefined, { append: true }).catch(() => {}));
  compare.addEventListener("click", () => {
    location.hash = `#/compare${query({ ids: [...selected].join(",") })}`;
  });
  root.replaceChildren(h("div", { class: "title-row" }, h("h1", {}, "Jobs"), compare), form, status, table, more);
  restart();
  return () => stopPolling();
}
