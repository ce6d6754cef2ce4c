// Job page: header, progress and ETA, live loss/lr/evaluation curves (history from
// /metrics, then the SSE stream), evaluation and final-metric tables, artifacts with signed
// download links, the log's tail, cancel and retry.

import { ApiError, request } from "../api.js";
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

  root.replaceChildren(h("p", { class: "muted" }, "Loading the job…"));

  function renderJob() {
    document.title = `${job.name} (${job.state}) · HMKD`;
    el.header.replaceChildren(jobHeader(job));
    el.progress.replaceChildren(progressLine(job));
    sizeBars(el.progress);
    el.failure.replaceChildren(job.error ? h("div", { class: "error", id: "job-error" }, h("strong", {}, `${job.state}: `), h("pre", {}, job.error)) : "");
    el.final.replaceChildren(finalMetrics(job));
    renderActions();
  }

  function renderActions() {
    const buttons = [];
    if (!TERMINAL.has(job.state) && !job.cancel_requested) {
      buttons.push(h("button", { type: "button", class: "danger", id: "cancel-job", onclick: cancel }, "Cancel job"));
    }
    if (job.state === "failed" || job.state === "cancelled") {
      buttons.push(h("button", { type: "button", class: "primary", id: "retry-job", onclick: retry }, "Retry"));
    }
    el.actions.replaceChildren(...buttons);
  }

  function renderSeries() {
    const [loss, lr, evals] = charts;
    loss.set(series.iteration, series.lossColumns());
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
      job = { ...data, spec: job.spec };
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
    root.replaceChildren(
      el.header,
      h("div", { class: "toolbar" }, el.progress, el.actions),
      el.actionError,
      el.failure,
      h(
        "div",
        { class: "grid charts" },
        section("Losses", "losses", el.lossChart),
        section("Learning rate", "lr", el.lrChart),
        section("Evaluation (%)", "evaluation", el.evalChart, el.evalTable),
        section("Final metrics", "final", el.final),
      ),
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
  };
}
