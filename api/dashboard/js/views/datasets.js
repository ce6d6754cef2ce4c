// Datasets: the team's versions (#/datasets) and one version (#/datasets/<name@version>): what
// each split holds, box sizes at native and at the model's input size, and sample images with
// their boxes drawn over them (fetched with the token, shown through blob: URLs).

import { request } from "../api.js";
import { boxedImage } from "../boxes.js";
import { bytes, code, emptyState, errorBox, h, when } from "../dom.js";

export function datasetsView(root) {
  const body = h("div", { id: "datasets" }, h("p", { class: "muted" }, "Loading datasets…"));
  root.replaceChildren(h("h2", {}, "Datasets"), body);
  const controller = new AbortController();
  request("/v1/datasets", { signal: controller.signal })
    .then((items) => {
      if (!items.length) {
        body.replaceChildren(emptyState("No datasets yet", h("span", {}, "Upload a COCO export with ", code("hmkd datasets upload NAME FOLDER"), ".")));
        return;
      }
      body.replaceChildren(
        h(
          "table",
          { class: "table datasets" },
          h("thead", {}, h("tr", {}, ["Dataset", "Source", "Train images", "Train boxes", "Val images", "Stored", "Created"].map((t) => h("th", {}, t)))),
          h(
            "tbody",
            {},
            items.map((d) =>
              h(
                "tr",
                {},
                h("td", {}, h("a", { href: `#/datasets/${encodeURIComponent(d.ref)}` }, d.ref)),
                h("td", {}, d.source),
                h("td", {}, String(d.stats.train?.images ?? "–")),
                h("td", {}, String(d.stats.train?.boxes ?? "–")),
                h("td", {}, String(d.stats.val?.images ?? "–")),
                h("td", {}, d.source === "upload" ? bytes(d.size) : "server folder"),
                h("td", {}, when(d.created_at)),
              ),
            ),
          ),
        ),
      );
    })
    .catch((err) => {
      if (err.name !== "AbortError") body.replaceChildren(errorBox(`Could not load datasets: ${err.message}`));
    });
  return () => controller.abort();
}

function sizeTable(stats) {
  const bins = Object.keys(stats.native_sizes);
  const most = Math.max(1, ...bins.map((b) => stats.native_sizes[b]), ...bins.map((b) => stats.input_sizes?.[b] ?? 0));
  const bar = (n) => {
    const fill = h("div", { class: "histogram-fill" });
    fill.style.width = `${(100 * n) / most}%`; // through the CSSOM: the CSP forbids style attributes
    return h("div", { class: "histogram-bar" }, fill, h("span", {}, String(n)));
  };
  const rows = [["at native size", stats.native_sizes]];
  if (stats.input_sizes && Object.keys(stats.input_sizes).length) rows.push(["at the model's input", stats.input_sizes]);
  return h(
    "table",
    { class: "table histogram" },
    h("thead", {}, h("tr", {}, h("th", {}, "boxes"), bins.map((b) => h("th", {}, b)))),
    h("tbody", {}, rows.map(([label, counts]) => h("tr", {}, h("th", {}, label), bins.map((b) => h("td", {}, bar(counts[b] ?? 0)))))),
  );
}

function splitSection(name, stats) {
  const empty = stats.categories.filter((c) => c.boxes === 0);
  return h(
    "section",
    { class: "panel", id: `split-${name}` },
    h("h3", {}, `${name}: ${stats.images} images, ${stats.boxes} boxes`),
    h("p", { class: "muted" }, `${stats.images_without_boxes} image(s) without boxes; ${stats.crowd} crowd region(s). Sizes are COCO's area ranges (side of an equal-area square: tiny < 8 px, xsmall < 16, small < 32, medium < 96); AP_S is measured at native size.`),
    h("table", { class: "table" }, h("thead", {}, h("tr", {}, h("th", {}, "category"), h("th", {}, "id"), h("th", {}, "boxes"))), h("tbody", {}, stats.categories.map((c) => h("tr", {}, h("td", {}, c.name), h("td", {}, String(c.id)), h("td", {}, String(c.boxes)))))),
    empty.length ? errorBox(`No boxes for ${empty.map((c) => `${c.name} (id ${c.id})`).join(", ")}: still a class the detector learns. Remove a placeholder category from the annotation file.`) : "",
    sizeTable(stats),
  );
}

export function datasetView(root, { match, params }) {
  const ref = decodeURIComponent(match[1]);
  const minSize = Number(params.get("min_size")) || 800;
  const controller = new AbortController();
  const urls = [];
  const head = h("div", { class: "page-head" }, h("h2", {}, ref), h("a", { href: "#/datasets" }, "All datasets"));
  const form = h(
    "form",
    { class: "filters", id: "input-size" },
    h("label", {}, "Input size (shorter side) ", h("input", { name: "min_size", type: "number", min: 32, max: 4096, value: String(minSize) })),
    h("button", { type: "submit" }, "Count at this size"),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = `#/datasets/${encodeURIComponent(ref)}?min_size=${new FormData(form).get("min_size")}`;
  });
  const body = h("div", { id: "dataset" }, h("p", { class: "muted" }, "Loading…"));
  const gallery = h("div", { class: "samples", id: "samples" });
  root.replaceChildren(head, form, body, h("h3", {}, "Sample images"), gallery);
  request(`/v1/datasets/${encodeURIComponent(ref)}?min_size=${minSize}`, { signal: controller.signal })
    .then((d) => {
      body.replaceChildren(
        h("p", { class: "muted" }, `${d.source === "upload" ? `uploaded, ${bytes(d.size)}` : "server folder"} · sha256 ${d.sha256.slice(0, 16)}… · name it in a spec as `, code(`dataset: ${d.ref}`)),
        ...Object.entries(d.stats).map(([name, stats]) => splitSection(name, stats)),
      );
      return request(`/v1/datasets/${encodeURIComponent(ref)}/samples?n=6`, { signal: controller.signal });
    })
    .then(async (samples) => {
      for (const sample of samples) {
        const { frame, url } = await boxedImage(`/v1/datasets/${encodeURIComponent(ref)}/images/${sample.image_id}?split=train`, {
          width: sample.width,
          height: sample.height,
          boxes: sample.boxes,
          caption: `${sample.file_name} · ${sample.boxes.length} box(es)`,
          signal: controller.signal,
        });
        urls.push(url);
        gallery.append(frame);
      }
    })
    .catch((err) => {
      if (err.name !== "AbortError") body.replaceChildren(errorBox(`Could not load ${ref}: ${err.message}`));
    });
  return () => {
    controller.abort();
    urls.forEach((u) => URL.revokeObjectURL(u));
  };
}
