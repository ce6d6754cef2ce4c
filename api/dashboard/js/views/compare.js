// Compare view: pick jobs, overlay one evaluation metric over iterations (e.g. AP_S of a
// `none` baseline against an `hmkd` student on the same data), with each job's final and best.

import { query, request } from "../api.js";
import { LineChart, alignSeries, colour } from "../charts.js";
import { code, emptyState, errorBox, h, percent, shortId, stateBadge } from "../dom.js";

const METRICS = ["AP_S", "AP", "AP50", "AP75", "AP_M", "AP_L", "AR@100", "AP_tiny", "AP_xsmall", "AP_small16_32"];

const FINAL = ["AP", "AP50", "AP_S", "AP_tiny", "AP_xsmall", "AP_S_input"];

function lastEvaluation(m) {
  return m.evaluations.length ? m.evaluations[m.evaluations.length - 1].metrics : {};
}

function signed(value) {
  if (typeof value !== "number") return "–";
  const text = (100 * value).toFixed(2);
  return value > 0 ? `+${text}` : text;
}

/** Every job's final AP, AP50, AP_S, AP_tiny, AP_xsmall and AP per category, each with its
 *  difference from the first job picked (the reference: a teacher, or a `none` baseline). */
function finalTable(loaded) {
  const finals = loaded.map(([, m]) => lastEvaluation(m));
  const categories = [...new Set(finals.flatMap((f) => Object.keys(f.per_category || {})))];
  const columns = [...FINAL.map((k) => [k, (f) => f[k]]), ...categories.map((c) => [`AP ${c}`, (f) => (f.per_category || {})[c]])];
  const reference = finals[0];
  const cell = (f, get, i) => {
    const value = get(f);
    const base = get(reference);
    const delta = i > 0 && typeof value === "number" && typeof base === "number" ? value - base : null;
    return h(
      "td",
      { class: "num" },
      percent(value, 2),
      delta === null ? "" : h("span", { class: delta > 0 ? "delta up" : delta < 0 ? "delta down" : "delta" }, ` (${signed(delta)})`),
    );
  };
  return h(
    "table",
    { class: "table", id: "compare-final" },
    h("caption", {}, `Final evaluation (%); in brackets, the difference from ${loaded[0][0].name}`),
    h("thead", {}, h("tr", {}, h("th", {}, "job"), columns.map(([name]) => h("th", {}, name)))),
    h("tbody", {}, finals.map((f, i) => h("tr", { dataset: { jobId: loaded[i][0].id } }, h("td", {}, `${loaded[i][0].name} (${loaded[i][0].method})`), columns.map(([, get]) => cell(f, get, i))))),
  );
}

function idsFrom(params) {
  return (params.get("ids") || "").split(",").filter((id) => /^[0-9a-f]{32}$/.test(id));
}

export function compareView(root, { params }) {
  const controller = new AbortController();
  const { signal } = controller;
  let ids = idsFrom(params);
  let metric = METRICS.includes(params.get("metric")) ? params.get("metric") : "AP_S";
  const picker = h("div", { class: "picker", id: "compare-picker" }, h("p", { class: "muted" }, "Loading jobs…"));
  const chartBox = h("div", { class: "chart", id: "compare-chart" });
  const summary = h("div", { id: "compare-summary" });
  const status = h("div");
  const chart = new LineChart(chartBox, { yLabel: `${metric} (%)`, points: true, height: 320 });
  const metricSelect = h("select", { id: "compare-metric" }, METRICS.map((m) => h("option", { value: m, selected: m === metric }, m)));
  const cache = new Map();
  let drawn = 0; // the latest draw wins when picks change faster than answers come

  function syncUrl() {
    history.replaceState(null, "", `#/compare${query({ ids: ids.join(","), metric })}`);
  }

  async function metricsOf(id) {
    if (!cache.has(id)) {
      cache.set(id, Promise.all([request(`/v1/jobs/${id}`, { signal }), request(`/v1/jobs/${id}/metrics`, { signal })]));
    }
    return cache.get(id);
  }

  async function draw() {
    const round = ++drawn;
    chart.options.yLabel = `${metric} (%)`;
    chart.destroyPlot();
    status.replaceChildren();
    if (!ids.length) {
      chartBox.dataset.series = "0";
      summary.replaceChildren(emptyState("Pick jobs to compare", "Tick two or more jobs on the left, e.g. a `none` baseline and an `hmkd` student on the same data."));
      return;
    }
    let loaded;
    try {
      loaded = await Promise.all(ids.map(metricsOf));
      if (round !== drawn) return;
    } catch (err) {
      if (err.name !== "AbortError") status.replaceChildren(errorBox(`Could not load a job: ${err.message}`));
      return;
    }
    const lines = loaded.map(([job, m]) => ({
      label: `${job.name} (${job.method}) ${shortId(job.id)}`,
      x: m.evaluations.map((e) => e.iteration),
      y: m.evaluations.map((e) => (typeof e.metrics[metric] === "number" ? 100 * e.metrics[metric] : null)),
    }));
    const { x, columns } = alignSeries(lines);
    chart.set(x, columns);
    summary.replaceChildren(
      h(
        "table",
        { class: "table", id: "compare-table" },
        h("thead", {}, h("tr", {}, ["", "job", "method", "state", "evaluations", `final ${metric} (%)`, `best ${metric} (%)`].map((t) => h("th", {}, t)))),
        h(
          "tbody",
          {},
          loaded.map(([job, m], i) => {
            const values = m.evaluations.map((e) => e.metrics[metric]).filter((v) => typeof v === "number");
            return h(
              "tr",
              { dataset: { jobId: job.id } },
              h("td", {}, h("span", { class: "swatch", dataset: { colour: colour(i) } })),
              h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name), " ", h("span", { class: "muted mono" }, shortId(job.id))),
              h("td", {}, job.method),
              h("td", {}, stateBadge(job.state)),
              h("td", { class: "num" }, String(m.evaluations.length)),
              h("td", { class: "num" }, percent(values[values.length - 1], 2)),
              h("td", { class: "num" }, values.length ? percent(Math.max(...values), 2) : "–"),
            );
          }),
        ),
      ),
    );
    summary.append(finalTable(loaded));
    for (const swatch of summary.querySelectorAll(".swatch")) swatch.style.background = swatch.dataset.colour;
  }

  async function loadPicker() {
    try {
      const page = await request(`/v1/jobs${query({ limit: 100 })}`, { signal });
      if (!page.items.length) {
        picker.replaceChildren(emptyState("No jobs yet", h("span", {}, "Submit one with ", code("hmkd submit ..."), ".")));
        return;
      }
      picker.replaceChildren(
        h(
          "ul",
          { class: "plain" },
          page.items.map((job) =>
            h(
              "li",
              {},
              h(
                "label",
                { class: "check" },
                h("input", { type: "checkbox", value: job.id, checked: ids.includes(job.id), onchange: (e) => toggle(job.id, e.target.checked) }),
                " ",
                job.name,
                " ",
                h("span", { class: "muted" }, `${job.method} · ${job.state} · ${shortId(job.id)}`),
              ),
            ),
          ),
        ),
      );
    } catch (err) {
      if (err.name !== "AbortError") picker.replaceChildren(errorBox(`Could not list jobs: ${err.message}`));
    }
  }

  function toggle(id, on) {
    ids = on ? [...new Set([...ids, id])] : ids.filter((x) => x !== id);
    syncUrl();
    draw();
  }

  metricSelect.addEventListener("change", () => {
    metric = metricSelect.value;
    syncUrl();
    draw();
  });

  root.replaceChildren(
    h("div", { class: "title-row" }, h("h1", {}, "Compare"), h("label", {}, "Metric ", metricSelect)),
    h("div", { class: "compare" }, h("aside", { class: "card" }, h("h2", {}, "Jobs"), picker), h("section", { class: "card" }, chartBox, status, summary)),
  );
  syncUrl();
  loadPicker();
  draw();
  return () => {
    controller.abort();
    chart.destroy();
  };
}
