// Live training charts (uPlot): loss and token accuracy against step, train and validation.
import { useEffect, useRef } from "preact/hooks";
import { fmtNum, html } from "./ui.js";

const COLORS = { train: "#4f46e5", valid: "#ea580c" };

/**
 * Metrics events -> one row per step: {step, train_loss, valid_loss, train_acc, valid_acc}, and a
 * DPO job's rewards: {train_reward_acc, valid_reward_acc, train_margin, valid_margin, chosen, rejected}.
 * Events may repeat a step (a resumed job): the newest wins.
 */
export function metricRows(events) {
  const byStep = new Map();
  for (const e of [...events].sort((a, b) => a.created_at - b.created_at)) {
    if (e.type !== "metrics" || !e.data || e.data.step === undefined) continue;
    const d = e.data;
    byStep.set(d.step, {
      step: d.step,
      total: d.total_steps,
      train_loss: d.train_loss ?? null,
      valid_loss: d.valid_loss ?? d.full_valid_loss ?? null,
      train_acc: d.train_mean_token_accuracy ?? null,
      valid_acc: d.valid_mean_token_accuracy ?? d.full_valid_mean_token_accuracy ?? null,
      // DPO jobs (train_loss is then the DPO loss): TRL's rewards/* per step.
      train_reward_acc: d.train_rewards_accuracy ?? null,
      valid_reward_acc: d.valid_rewards_accuracy ?? d.full_valid_rewards_accuracy ?? null,
      train_margin: d.train_rewards_margin ?? null,
      valid_margin: d.valid_rewards_margin ?? d.full_valid_rewards_margin ?? null,
      chosen: d.train_rewards_chosen ?? null,
      rejected: d.train_rewards_rejected ?? null,
    });
  }
  return [...byStep.values()].sort((a, b) => a.step - b.step);
}

function showLatest(u) {
  const n = u.data[0].length;
  if (n) u.setLegend({ idx: n - 1 }, false);
}

function seriesData(rows, keys) {
  return [rows.map((r) => r.step), ...keys.map((k) => rows.map((r) => r[k]))];
}

/** One uPlot chart that follows `rows` as they grow; `keys` are [trainKey, validKey]. */
export function MetricChart({ title, rows, keys, percent = false, note, testid }) {
  const box = useRef(null);
  const plot = useRef(null);
  const fmt = (v) => (v === null || v === undefined ? "—" : percent ? `${(v * 100).toFixed(1)}%` : fmtNum(v, 3));

  useEffect(() => {
    const el = box.current;
    const opts = {
      width: el.clientWidth || 480,
      height: 220,
      legend: { live: true },
      // Off the plot, the legend shows the latest step instead of blanks.
      hooks: { setCursor: [(u) => u.cursor.idx == null && showLatest(u)] },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: false } },
      axes: [
        { label: "step", stroke: "#64748b", grid: { stroke: "#eef2f7" } },
        {
          stroke: "#64748b",
          grid: { stroke: "#eef2f7" },
          size: 56,
          values: (u, splits) => splits.map((v) => (percent ? `${Math.round(v * 100)}%` : v.toPrecision(2))),
        },
      ],
      series: [
        { label: "step" },
        { label: "train", stroke: COLORS.train, width: 2, value: (u, v) => fmt(v) },
        {
          label: "validation",
          stroke: COLORS.valid,
          width: 2,
          spanGaps: true,
          points: { show: true, size: 5 },
          value: (u, v) => fmt(v),
          show: true,
        },
      ],
    };
    plot.current = new window.uPlot(opts, seriesData(rows, keys), el);
    showLatest(plot.current);
    const ro = new ResizeObserver(() => {
      if (plot.current && el.clientWidth) plot.current.setSize({ width: el.clientWidth, height: 220 });
    });
    ro.observe(el);
    return () => {
      ro.disconnect();
      plot.current.destroy();
      plot.current = null;
    };
  }, []);

  useEffect(() => {
    if (!plot.current) return;
    plot.current.setData(seriesData(rows, keys));
    showLatest(plot.current);
  }, [rows]);

  return html`<div class="chart-card" data-testid=${testid} data-points=${rows.length}>
    <div class="chart-title">
      ${title}
      ${note && html`<span class="muted small">${note}</span>`}

    </div>
    <div class="chart" ref=${box}>
      ${!rows.length && html`<div class="chart-empty muted">Waiting for the first training metrics…</div>`}
    </div>
  </div>`;
}
