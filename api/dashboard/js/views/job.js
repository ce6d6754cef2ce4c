// Job page: header, progress and ETA, live loss/lr/evaluation curves (history from
// /metrics, then the SSE stream), evaluation and final-metric tables, artifacts with signed
// download links, the log's tail, cancel and retry.

import { ApiError, request } from "../api.js";
import { boxedImage } from "../boxes.js";
import { LineChart } from "../charts.js";
import { confirmAction } from "../confirm.js";
import { emptyState, errorBox, h, sizeBars } from "../dom.js";
import { readEvents } from "../sse.js";
import { TERMINAL, artifactList, evaluationTable, finalMetrics, jobHeader, progressLine } from "./job_parts.js";
import { JobSeries } from "./job_series.js";

const LOG_LINES = 200;
const LOG_KEEP_CHARS = 200_000;

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function section(title, id, ...content) {
  return h("section", { class: "card", id }, h("h2", {}, title), ...content);
}

export function jobView(root, { match }) {
  const id = match[1];
  const controller = new AbortController();
  const { signal } = controller;
  const el = {
    header: h("div"),
    progress: h("div", { class: "grow" }),
    actions: h("div", { class: "actions", id: "job-actions" }),
    actionError: h("div", { id: "action-error" }),
    failure: h("div"),
    lossChart: h("div", { class: "chart", id: "loss-chart" }),
    lossDetail: h("input", { type: "checkbox", id: "loss-detail" }),
    warnings: h("div", { id: "job-warnings" }),
    resubmit: h("div", { id: "resubmit" }),
    predictions: h("div", { id: "predictions" }),
    lrChart: h("div", { class: "chart", id: "lr-chart" }),
    evalChart: h("div", { class: "chart", id: "eval-chart" }),
    evalTable: h("div"),
    final: h("div"),
    artifacts: h("div", { id: "artifacts" }),
    log: h("pre", { class: "log", id: "log" }),
    spec: h("pre", { class: "spec" }),
  };
  let job = null;
  let series = null;
  let charts = [];
  let following = false;
  let logOffset = null;
  const imageUrls = []; // blob: URLs of the prediction images, revoked when the view goes

  root.replaceChildren(h("p", { class: "muted" }, "Loading the job…"));

  function renderJob() {
    document.title = `${job.name} (${job.state}) · HMKD`;
    el.header.replaceChildren(jobHeader(job));
    el.progress.replaceChildren(progressLine(job));
    sizeBars(el.progress);
    el.failure.replaceChildren(job.error ? h("div", { class: "error", id: "job-error" }, h("strong", {}, `${job.state}: `), h("pre", {}, job.error)) : "");
    el.final.replaceChildren(finalMetrics(job));
    if (job.warnings) el.warnings.replaceChildren(...job.warnings.map((w) => h("div", { class: "warning" }, w)));
    renderActions();
  }

  // A failed job whose spec was wrong only fails again on retry: edit a copy and submit it.
  function openResubmit() {
    const text = h("textarea", { id: "resubmit-spec", rows: 18, spellcheck: false });
    const copy = structuredClone({ ...job.spec, name: `${job.name} (edited)` });
    if (copy.dataset && copy.data) {
      delete copy.data.train; // filled from the dataset at submit: named once, by `dataset`
      delete copy.data.val;
    }
    text.value = JSON.stringify(copy, null, 2);
    const problem = h("div", { id: "resubmit-error" });
    const send = async () => {
      problem.replaceChildren();
      let spec;
      try {
        spec = JSON.parse(text.value);
      } catch (err) {
        problem.replaceChildren(errorBox(`Not valid JSON: ${err.message}`));
        return;
      }
      try {
        const made = await request("/v1/jobs", { method: "POST", body: spec, signal });
        location.hash = `#/jobs/${made.id}`;
      } catch (err) {
        if (err.name !== "AbortError") problem.replaceChildren(errorBox(err.message));
      }
    };
    el.resubmit.replaceChildren(
      section(
        "Edit and resubmit",
        "resubmit-card",
        h("p", { class: "muted" }, "A new job from this spec; the failed one stays as it is."),
        text,
        problem,
        h("div", { class: "actions" }, h("button", { type: "button", class: "primary", id: "resubmit-send", onclick: send }, "Submit as a new job"), h("button", { type: "button", onclick: () => el.resubmit.replaceChildren() }, "Close")),
      ),
    );
  }

  function renderActions() {
    const buttons = [];
    if (!TERMINAL.has(job.state) && !job.cancel_requested) {
      buttons.push(h("button", { type: "button", class: "danger", id: "cancel-job", onclick: cancel }, "Cancel job"));
    }
    if (job.state === "failed" || job.state === "cancelled") {
      buttons.push(h("button", { type: "button", class: "primary", id: "retry-job", onclick: retry }, "Retry"));
      buttons.push(h("button", { type: "button", id: "edit-resubmit", onclick: openResubmit }, "Edit and resubmit"));
    }
    el.actions.replaceChildren(...buttons);
  }

  function renderSeries() {
    const [loss, lr, evals] = charts;
    loss.set(series.iteration, el.lossDetail.checked ? series.lossColumns() : series.lossGroups());
    lr.set(series.iteration, [["lr", series.lr]]);
    evals.set(series.evaluations.map((e) => e.iteration), series.evaluationColumns(["AP", "AP_S"]));
    el.evalTable.replaceChildren(evaluationTable(series.evaluations));
  }

  async function act(path, confirmText) {
    if (!(await confirmAction(confirmText))) return;
    el.actionError.replaceChildren();
    try {
      job = await request(path, { method: "POST", signal });
      renderJob();
      follow();
    } catch (err) {
      if (err.name !== "AbortError") el.actionError.replaceChildren(errorBox(err.message));
    }
  }

  const cancel = () => act(`/v1/jobs/${id}/cancel`, {
    title: `Cancel ${job.name}?`,
    text: job.state === "running"
      ? "The job stops within seconds, after its current step. Retry resumes it from its last checkpoint."
      : "The job leaves the queue now. Retry queues it again.",
    confirmLabel: "Cancel job",
  });
  const retry = () => act(`/v1/jobs/${id}/retry`, {
    title: `Retry ${job.name}?`,
    text: "The job is queued again and resumes from its last checkpoint.",
    confirmLabel: "Retry",
  });

  async function download(artifact, copy) {
    el.actionError.replaceChildren();
    try {
      const link = await request(`/v1/jobs/${id}/artifact-links`, { method: "POST", body: { name: artifact.name }, signal });
      const url = new URL(link.url, location.origin).href;
      if (copy) {
        await navigator.clipboard.writeText(url);
        el.actionError.replaceChildren(h("p", { class: "muted" }, `Link to ${artifact.name} copied; it works without a token until ${new Date(link.expires_at).toLocaleTimeString()}.`));
        return;
      }
      const a = h("a", { href: url, download: artifact.name.split("/").pop(), hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
    } catch (err) {
      if (err.name !== "AbortError") el.actionError.replaceChildren(errorBox(`Download of ${artifact.name} failed: ${err.message}`));
    }
  }

  async function loadArtifacts() {
    const artifacts = await request(`/v1/jobs/${id}/artifacts`, { signal });
    el.artifacts.replaceChildren(artifactList(artifacts, { onDownload: (a) => download(a, false), onCopy: (a) => download(a, true) }));
    if (artifacts.some((a) => a.name === "run/predictions.json") && !el.predictions.childElementCount) await loadPredictions();
  }

  // What the student detects on the first validation images (red), over their true boxes (green).
  async function loadPredictions() {
    const response = await request(`/v1/jobs/${id}/artifacts/run/predictions.json`, { signal, raw: true, accept: "application/octet-stream" });
    const found = JSON.parse(await response.text());
    const frames = [];
    for (const image of found.images) {
      const boxes = [...image.truth.map((b) => ({ ...b, kind: "truth" })), ...image.detections.map((b) => ({ ...b, kind: "detection" }))];
      const { frame, url } = await boxedImage(`/v1/jobs/${id}/images/${image.image_id}`, {
        width: image.width,
        height: image.height,
        boxes,
        caption: `${image.file_name}: ${image.detections.length} detection(s), ${image.truth.length} true box(es)`,
        signal,
      });
      imageUrls.push(url);
      frames.push(frame);
    }
    el.predictions.replaceChildren(
      h("p", { class: "muted" }, `Green: true boxes. Red: the student's detections scoring at least ${(100 * found.min_score).toFixed(0)}%.`),
      h("div", { class: "samples" }, frames),
    );
  }

  async function loadLog() {
    const path = logOffset === null ? `/v1/jobs/${id}/logs?tail=${LOG_LINES}` : `/v1/jobs/${id}/logs?offset=${logOffset}`;
    const response = await request(path, { raw: true, signal, accept: "text/plain" });
    const text = await response.text();
    logOffset = Number(response.headers.get("X-Log-Offset") || 0);
    if (!text && el.log.textContent) return;
    const stick = el.log.scrollTop + el.log.clientHeight >= el.log.scrollHeight - 4;
    el.log.textContent = (el.log.textContent + text).slice(-LOG_KEEP_CHARS) || "(the log is empty so far)";
    if (stick) el.log.scrollTop = el.log.scrollHeight;
  }

  async function refreshAll() {
    job = await request(`/v1/jobs/${id}`, { signal });
    series = new JobSeries(await request(`/v1/jobs/${id}/metrics`, { signal }));
    renderJob();
    renderSeries();
    await Promise.all([loadArtifacts(), loadLog()]);
  }

  function onEvent({ event, data }) {
    if (event === "evaluation") {
      series.addEvaluation(data);
      renderSeries();
    } else if (event === "state" || event === "progress") {
      job = { ...data, spec: job.spec, warnings: job.warnings };
      renderJob();
      if (series.addProgress(job)) renderSeries();
    }
  }

  async function follow() {
    if (following || TERMINAL.has(job.state)) return;
    following = true;
    let delay = 1000;
    const logTimer = setInterval(() => loadLog().catch(() => {}), 2000);
    try {
      while (!signal.aborted && !TERMINAL.has(job.state)) {
        try {
          await readEvents(`/v1/jobs/${id}/events`, { signal, onEvent });
          delay = 1000;
        } catch (err) {
          if (err.name === "AbortError") return;
          await sleep(delay, signal);
          delay = Math.min(2 * delay, 15000);
        }
      }
      if (!signal.aborted) await refreshAll(); // exact final series, files and log
    } catch (err) {
      if (err.name !== "AbortError") el.actionError.replaceChildren(errorBox(err.message));
    } finally {
      clearInterval(logTimer);
      following = false;
    }
  }

  async function start() {
    try {
      job = await request(`/v1/jobs/${id}`, { signal });
    } catch (err) {
      if (err.name === "AbortError") return;
      root.replaceChildren(
        err instanceof ApiError && err.status === 404
          ? emptyState("Job not found", `No job ${id} in your team: it belongs to another team, or the id is wrong.`, h("a", { href: "#/jobs" }, "Back to the jobs"))
          : errorBox(`Could not load job ${id}: ${err.message}`),
      );
      return;
    }
    el.spec.textContent = JSON.stringify(job.spec, null, 2);
    el.lossDetail.addEventListener("change", () => renderSeries());
    root.replaceChildren(
      el.header,
      h("div", { class: "toolbar" }, el.progress, el.actions),
      el.actionError,
      el.failure,
      el.warnings,
      el.resubmit,
      h(
        "div",
        { class: "grid charts" },
        section("Losses", "losses", h("label", { class: "check" }, el.lossDetail, " every term (else summed per module)"), el.lossChart),
        section("Learning rate", "lr", el.lrChart),
        section("Evaluation (%)", "evaluation", el.evalChart, el.evalTable),
        section("Final metrics", "final", el.final),
      ),
      section("What the student detects", "predictions-card", el.predictions),
      section("Files", "files", el.artifacts),
      section("Log (tail)", "logs", el.log),
      h("details", { class: "card" }, h("summary", {}, "Spec as submitted"), el.spec),
    );
    charts = [
      new LineChart(el.lossChart, { yLabel: "loss" }),
      new LineChart(el.lrChart, { yLabel: "lr", height: 180 }),
      new LineChart(el.evalChart, { yLabel: "%", points: true, height: 200 }),
    ];
    try {
      await refreshAll();
    } catch (err) {
      if (err.name !== "AbortError") el.actionError.replaceChildren(errorBox(err.message));
    }
    follow();
  }

  start();
  return () => {
    controller.abort();
    document.title = "HMKD dashboard";
    for (const chart of charts) chart.destroy();
    imageUrls.forEach((u) => URL.revokeObjectURL(u));
  };
}
