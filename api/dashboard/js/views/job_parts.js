// Pieces of the job page that only render what they are given: header facts, the evaluation
// and final-metric tables, the artifact list.

import { bytes, duration, h, number, percent, progressBar, shortId, stateBadge, when } from "../dom.js";

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const EVAL_COLUMNS = ["AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"];
const FINAL_ORDER = ["AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR@100", "AP_tiny", "AP_xsmall", "AP_small16_32"];

function fact(label, value) {
  return h("div", { class: "fact" }, h("dt", {}, label), h("dd", {}, value));
}

export function jobHeader(job) {
  const ran = job.started_at ? ((job.finished_at ? Date.parse(job.finished_at) : Date.now()) - Date.parse(job.started_at)) / 1000 : null;
  return h(
    "div",
    { class: "job-header" },
    h("div", { class: "title-row" }, h("h1", { id: "job-title" }, job.name), stateBadge(job.state), job.cancel_requested && !TERMINAL.has(job.state) ? h("span", { class: "badge" }, "cancel requested") : ""),
    h(
      "dl",
      { class: "facts" },
      fact("id", h("span", { class: "mono" }, job.id)),
      fact("kind", job.method === "none" ? job.kind : `${job.kind} · ${job.method}`),
      fact("queue", `${job.queue} (priority ${job.priority})`),
      fact("GPUs", (job.nodes > 1 ? `${job.nodes} nodes × ` : "") + (job.gpus ? String(job.gpus) : "CPU")),
      fact("attempt", `${job.attempt} of ${job.max_attempts}`),
      job.teacher_job_id ? fact("teacher", h("a", { href: `#/jobs/${job.teacher_job_id}` }, shortId(job.teacher_job_id))) : "",
      fact("submitted", when(job.created_at)),
      fact("started", when(job.started_at)),
      fact(job.finished_at ? "finished" : "running for", job.finished_at ? when(job.finished_at) : duration(ran)),
      job.finished_at && ran !== null ? fact("took", duration(ran)) : "",
    ),
  );
}

export function progressLine(job) {
  const label = job.state === "queued"
    ? `queued, position ${job.queue_position ?? "?"} in ${job.queue}`
    : job.state === "waiting"
    ? `waiting for teacher job ${job.teacher_job_id ?? "?"} to succeed`
    : `iteration ${job.iteration} / ${job.total_iterations} (${job.progress.toFixed(1)}%)`;
  const extra = [];
  if (job.state === "running") {
    extra.push(`ETA ${duration(job.eta_s)}`);
    if (typeof job.images_per_s === "number") extra.push(`${job.images_per_s.toFixed(1)} images/s`);
    if (typeof job.lr === "number") extra.push(`lr ${number(job.lr)}`);
  }
  return h("div", { class: "progress-line", id: "job-progress" }, progressBar(job.progress, label), h("span", { class: "muted", id: "job-eta" }, extra.join(" · ")));
}

export function evaluationTable(evaluations) {
  if (!evaluations.length) return h("p", { class: "muted" }, "No evaluation yet (every `eval.every` iterations and at the end).");
  return h(
    "table",
    { class: "table num-table", id: "eval-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "iteration"), EVAL_COLUMNS.map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      evaluations.map((e) => h("tr", {}, h("td", {}, String(e.iteration)), EVAL_COLUMNS.map((c) => h("td", { dataset: { metric: c } }, percent(e.metrics[c]))))),
    ),
  );
}

function perCategory(per) {
  const rows = Object.entries(per || {});
  if (!rows.length) return "";
  const value = (v) => (typeof v === "number" ? percent(v) : typeof v === "object" && v ? percent(v.AP) : "–");
  return h(
    "details",
    { class: "per-category" },
    h("summary", {}, `AP per category (${rows.length})`),
    h("table", { class: "table num-table" }, h("tbody", {}, rows.map(([name, v]) => h("tr", {}, h("td", {}, name), h("td", {}, value(v)))))),
  );
}

export function finalMetrics(job) {
  const ev = job.latest_eval;
  if (job.state !== "succeeded" || !ev) {
    return h("p", { class: "muted" }, job.state === "succeeded" ? "This job stored no evaluation (no validation split)." : "Shown when the job has succeeded.");
  }
  const keys = [...FINAL_ORDER.filter((k) => typeof ev[k] === "number"), ...Object.keys(ev).filter((k) => !FINAL_ORDER.includes(k) && k !== "iteration" && typeof ev[k] === "number").sort()];
  return h(
    "div",
    {},
    h(
      "table",
      { class: "table num-table", id: "final-metrics" },
      h("thead", {}, h("tr", {}, h("th", {}, "metric"), h("th", {}, "final (%)"), h("th", {}, "best (%)"))),
      h("tbody", {}, keys.map((k) => h("tr", { dataset: { metric: k } }, h("td", {}, k), h("td", { class: "final" }, percent(ev[k], 2)), h("td", {}, percent((job.best_eval || {})[k], 2))))),
    ),
    perCategory(ev.per_category),
  );
}

const KIND_ORDER = ["student", "best", "checkpoint", "eval", "spec", "metrics", "logs", "other"];

export function artifactList(artifacts, { onDownload, onCopy }) {
  if (!artifacts.length) return h("p", { class: "muted" }, "No files yet: checkpoints appear every `checkpoint.every` iterations, the student at the end.");
  const main = artifacts.filter((a) => a.kind !== "tensorboard").sort((a, b) => KIND_ORDER.indexOf(a.kind) - KIND_ORDER.indexOf(b.kind) || a.name.localeCompare(b.name));
  const board = artifacts.filter((a) => a.kind === "tensorboard");
  const rowOf = (a) =>
    h(
      "tr",
      { dataset: { artifact: a.name } },
      h("td", { class: "mono" }, a.name),
      h("td", {}, a.kind),
      h("td", { class: "num" }, bytes(a.size)),
      h("td", { class: "mono muted", title: a.sha256 }, a.sha256.slice(0, 12)),
      h("td", {}, h("button", { type: "button", class: "download", onclick: () => onDownload(a) }, "Download"), " ", h("button", { type: "button", class: "quiet copy-link", onclick: () => onCopy(a), title: "A link that works without a token for a few minutes (curl, wget)" }, "Copy link")),
    );
  const table = (rows) => h("table", { class: "table artifacts" }, h("thead", {}, h("tr", {}, ["name", "kind", "size", "sha256", ""].map((t) => h("th", {}, t)))), h("tbody", {}, rows.map(rowOf)));
  return h("div", {}, table(main), board.length ? h("details", {}, h("summary", {}, `TensorBoard event files (${board.length})`), table(board)) : "");
}
