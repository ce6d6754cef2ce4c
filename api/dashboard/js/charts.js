// Line charts on uPlot (vendored, see vendor/README.md): one x column of iterations and one
// column per series. A chart is rebuilt when its set of series changes (a loss component that
// appears mid-run), otherwise its data are swapped in place.

/* global uPlot */

const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

export function colour(i) {
  return PALETTE[i % PALETTE.length];
}

/** Axis ticks with three significant digits: uPlot's default shows a learning rate of 3e-4
 * as 0. */
export function tickLabel(value) {
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs < 1e-3 || abs >= 1e5) return value.toExponential(1);
  return String(Number(value.toPrecision(3)));
}

export class LineChart {
  /** `el`: the container; `options`: {yLabel, xLabel, points, height, logY}. */
  constructor(el, { yLabel = "", xLabel = "iteration", points = false, height = 240, logY = false } = {}) {
    this.el = el;
    this.options = { yLabel, xLabel, points, height, logY };
    this.plot = null;
    this.labels = [];
    this.resize = new ResizeObserver(() => {
      if (this.plot) this.plot.setSize({ width: this.width(), height: this.options.height });
    });
    this.resize.observe(el);
  }

  width() {
    return Math.max(280, this.el.clientWidth || 600);
  }

  /** x: iterations; columns: [[label, values]] of x's length (null where missing). */
  set(x, columns) {
    const labels = columns.map(([label]) => label);
    const data = [x, ...columns.map(([, values]) => values)];
    this.el.dataset.series = String(labels.length);
    this.el.dataset.points = String(x.length);
    if (!x.length) {
      this.destroyPlot();
      const note = document.createElement("p");
      note.className = "muted chart-empty";
      note.textContent = "No points yet: they appear as the job reports progress.";
      this.el.replaceChildren(note);
      return;
    }
    if (this.plot && labels.join("\u0000") === this.labels.join("\u0000")) {
      this.plot.setData(data);
      return;
    }
    this.destroyPlot();
    this.el.replaceChildren();
    this.labels = labels;
    const { yLabel, xLabel, points, height, logY } = this.options;
    this.plot = new uPlot(
      {
        width: this.width(),
        height,
        scales: { x: { time: false }, y: logY ? { distr: 3 } : {} },
        axes: [
          { label: xLabel },
          { label: yLabel, size: 64, values: (u, ticks) => ticks.map(tickLabel) },
        ],
        series: [
          { label: xLabel },
          ...labels.map((label, i) => ({
            label,
            stroke: colour(i),
            width: 1.5,
            spanGaps: true,
            value: (u, v) => (v === null || v === undefined ? "--" : tickLabel(v)),
            points: { show: points || x.length < 3, size: 6 },
          })),
        ],
        legend: { live: true },
        cursor: { drag: { x: true, y: false } },
      },
      data,
      this.el,
    );
  }

  destroyPlot() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }

  destroy() {
    this.resize.disconnect();
    this.destroyPlot();
  }
}

/** Put several (x, y) series on one x axis (iterations may differ per series). */
export function alignSeries(series) {
  const xs = [...new Set(series.flatMap((s) => s.x))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const columns = series.map((s) => {
    const column = new Array(xs.length).fill(null);
    s.x.forEach((x, i) => {
      column[index.get(x)] = s.y[i];
    });
    return [s.label, column];
  });
  return { x: xs, columns };
}
