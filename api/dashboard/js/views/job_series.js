// The job's metric history as columns, kept in step with live progress: the /metrics answer
// seeds it, each progress event of the stream appends a point, each evaluation event adds or
// replaces the evaluation of its iteration.

export class JobSeries {
  constructor(metrics) {
    this.iteration = [...metrics.iteration];
    this.lr = [...metrics.lr];
    this.losses = new Map(Object.entries(metrics.losses).map(([k, v]) => [k, [...v]]));
    this.evaluations = [];
    for (const e of metrics.evaluations) this.addEvaluation(e);
  }

  /** Append the job's latest point if it is past the last one; true when something changed. */
  addProgress(job) {
    const last = this.iteration.length ? this.iteration[this.iteration.length - 1] : -1;
    if (!job.losses || job.iteration <= last) return false;
    const n = this.iteration.length;
    this.iteration.push(job.iteration);
    this.lr.push(job.lr ?? null);
    for (const name of Object.keys(job.losses)) {
      if (!this.losses.has(name)) this.losses.set(name, new Array(n).fill(null));
    }
    for (const [name, column] of this.losses) column.push(job.losses[name] ?? null);
    return true;
  }

  addEvaluation(evaluation) {
    const i = this.evaluations.findIndex((e) => e.iteration === evaluation.iteration);
    if (i >= 0) this.evaluations[i] = evaluation;
    else this.evaluations.push(evaluation);
    this.evaluations.sort((a, b) => a.iteration - b.iteration);
  }

  lossColumns() {
    return [...this.losses.keys()].sort().map((name) => [name, this.losses.get(name)]);
  }

  /** The total, the detector's own terms summed (`student.*`), and each distillation
   *  module's terms summed (`distill.loss_hm_p2` + `distill.loss_hm_p3` ... -> `hm`): a
   *  handful of lines instead of one per term. */
  lossGroups() {
    const groups = new Map([["total", null], ["detection", null]]);
    for (const name of this.losses.keys()) {
      const m = /^distill\.loss_([a-z0-9]+)_/.exec(name);
      const group = name.startsWith("student.") ? "detection" : m ? m[1] : name;
      if (!groups.get(group)) groups.set(group, []);
      groups.get(group).push(name);
    }
    groups.set("total", [...this.losses.keys()]);
    const sum = (names) => this.iteration.map((_, i) => {
      let total = null;
      for (const name of names) {
        const v = this.losses.get(name)[i];
        if (typeof v === "number") total = (total ?? 0) + v;
      }
      return total;
    });
    return [...groups].filter(([, names]) => names && names.length).map(([group, names]) => [group, sum(names)]);
  }

  evaluationColumns(metrics) {
    return metrics.map((m) => [m, this.evaluations.map((e) => (typeof e.metrics[m] === "number" ? 100 * e.metrics[m] : null))]);
  }
}
