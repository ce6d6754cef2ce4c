// Queue view: per queue what runs and waits (counts over every team, ids of yours), the
// workers with their GPUs and heartbeats, and your team's active jobs.

import { query, request } from "../api.js";
import { code, emptyState, errorBox, h, progressBar, shortId, sizeBars, stateBadge, duration } from "../dom.js";
import { every } from "../poll.js";

const STALE_HEARTBEAT_S = 30;

function jobLink(job) {
  return h("a", { href: `#/jobs/${job.id}` }, job.name, " ", h("span", { class: "muted mono" }, shortId(job.id)));
}

function queueCard(queue, active) {
  const running = active.filter((j) => j.queue === queue.name && j.state === "running");
  const queued = active.filter((j) => j.queue === queue.name && j.state === "queued").sort((a, b) => (a.queue_position ?? 0) - (b.queue_position ?? 0));
  return h(
    "section",
    { class: "card queue", dataset: { queue: queue.name } },
    h("h2", {}, queue.name),
    h(
      "div",
      { class: "stats" },
      h("div", {}, h("strong", { class: "stat-running" }, String(queue.running)), h("span", {}, "running")),
      h("div", {}, h("strong", { class: "stat-queued" }, String(queue.queued)), h("span", {}, "queued")),
    ),
    h("p", { class: "muted small" }, "Counts cover every team; the jobs below are your team's."),
    running.length
      ? h("ul", { class: "plain" }, running.map((j) => h("li", {}, stateBadge("running"), " ", jobLink(j), progressBar(j.progress, `${j.iteration}/${j.total_iterations} · ETA ${duration(j.eta_s)}`))))
      : "",
    queued.length
      ? h("ol", { class: "plain" }, queued.map((j) => h("li", {}, h("span", { class: "position" }, `#${j.queue_position ?? "?"}`), " ", jobLink(j), h("span", { class: "muted" }, ` priority ${j.priority}`))))
      : "",
    !running.length && !queued.length ? h("p", { class: "muted" }, "None of your team's jobs here.") : "",
  );
}

function gpuList(gpus) {
  if (!gpus || !gpus.length) return h("span", { class: "muted" }, "CPU only");
  return h("ul", { class: "plain" }, gpus.map((g) => h("li", {}, `${g.index ?? "?"}: ${g.name ?? "GPU"}`, g.memory_mb ? ` (${Math.round(g.memory_mb / 1024)} GiB)` : "")));
}

function workersTable(workers) {
  if (!workers.length) {
    return emptyState("No workers", "Start one with ", code("hmkd worker --queue default"), " (", code("hmkd serve"), " starts one for you).");
  }
  return h(
    "table",
    { class: "table", id: "workers" },
    h("thead", {}, h("tr", {}, ["Worker", "Queues", "GPUs", "Running", "Heartbeat"].map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      workers.map((w) =>
        h(
          "tr",
          { class: w.heartbeat_age_s > STALE_HEARTBEAT_S ? "stale" : "" },
          h("td", { class: "mono" }, w.name),
          h("td", {}, w.queues.join(", ")),
          h("td", {}, gpuList(w.gpus)),
          h("td", {}, w.current_job_id ? h("a", { href: `#/jobs/${w.current_job_id}` }, shortId(w.current_job_id)) : h("span", { class: "muted" }, "idle or another team's")),
          h("td", {}, `${duration(w.heartbeat_age_s)} ago`, w.heartbeat_age_s > STALE_HEARTBEAT_S ? h("span", { class: "badge state-failed" }, "stale") : ""),
        ),
      ),
    ),
  );
}

export function queueView(root) {
  const body = h("div", { class: "queue-body" }, h("p", { class: "muted" }, "Loading the queue…"));
  root.replaceChildren(h("h1", {}, "Queue"), body);
  return every(3000, async (signal) => {
    try {
      const [overview, active] = await Promise.all([
        request("/v1/queue", { signal }),
        request(`/v1/jobs${query({ state: ["running", "queued"], limit: 200 })}`, { signal }),
      ]);
      const queues = overview.queues.length
        ? h("div", { class: "grid" }, overview.queues.map((q) => queueCard(q, active.items)))
        : emptyState("No queues yet", "A queue appears when a worker serves it or a job names it.");
      body.replaceChildren(queues, h("section", { class: "card workers" }, h("h2", {}, "Workers"), workersTable(overview.workers)));
      sizeBars(body);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      body.replaceChildren(errorBox(`Could not load the queue: ${err.message}`));
      throw err;
    }
  });
}
