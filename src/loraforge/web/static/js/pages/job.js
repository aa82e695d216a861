// Job detail: status and actions (cancel / pause / resume), progress, live loss and accuracy
// charts from the metrics events, checkpoints, result files, export download, the events feed.
import { useRef, useState } from "preact/hooks";
import { api, ApiError, decodeBase64Csv, download } from "../api.js";
import { MetricChart, metricRows } from "../chart.js";
import { ExportButton } from "./export.js";
import {
  html, Copy, ErrorBox, Notice, ProgressBar, StatusBadge, TERMINAL,
  fmtBytes, fmtDuration, fmtNum, fmtPct, fmtTime, jobMethod, usePoll,
} from "../ui.js";

/** Fetch events newer than the ones we have (pages are newest first; `after` goes older). */
async function newEvents(jobId, known) {
  const fresh = [];
  let after;
  for (let page = 0; page < 50; page++) {
    const res = await api(`/fine_tuning/jobs/${jobId}/events`, { params: { limit: 200, after } });
    const unseen = res.data.filter((e) => !known.has(e.id));
    fresh.push(...unseen);
    if (!res.has_more || unseen.length < res.data.length || !res.data.length) break;
    after = res.data[res.data.length - 1].id;
  }
  return fresh;
}

function Actions({ job, onChange }) {
  const [error, setError] = useState(null);
  const [missing, setMissing] = useState({});
  const act = async (verb) => {
    if (verb === "cancel" && !confirm(`Cancel ${job.id}?`)) return;
    setError(null);
    try {
      onChange(await api(`/fine_tuning/jobs/${job.id}/${verb}`, { method: "POST" }));
    } catch (e) {
      if (e instanceof ApiError && e.missing) setMissing({ ...missing, [verb]: true });
      else setError(e);
    }
  };
  const done = TERMINAL.includes(job.status);
  const paused = job.status === "paused";
  return html`<div class="actions-col">
    <div class="actions">
      ${job.fine_tuned_model &&
      html`<a class="btn primary" href=${`#/playground?model=${encodeURIComponent(job.fine_tuned_model)}`}>Open in playground</a>`}
      <button class="btn" data-action="pause" disabled=${done || paused} onClick=${() => act("pause")}>Pause</button>
      <button class="btn" data-action="resume" disabled=${!paused} onClick=${() => act("resume")}>Resume</button>
      <button class="btn danger" data-action="cancel" disabled=${done} onClick=${() => act("cancel")}>Cancel job</button>
    </div>
    ${Object.keys(missing).map(
      (v) => html`<${Notice} kind="warn">${v[0].toUpperCase() + v.slice(1)} is not available on this server yet.</${Notice}>`,
    )}
    <${ErrorBox} error=${error} />
  </div>`;
}

/** A DPO job's latest rewards: beta x (log pi - log pi_ref) of the chosen and rejected answers. */
function DpoRewards({ last }) {
  const rows = [
    ["Chosen reward", fmtNum(last && last.chosen, 3)],
    ["Rejected reward", fmtNum(last && last.rejected, 3)],
    ["Reward accuracy", fmtPct(last && last.train_reward_acc)],
    ["Margin", fmtNum(last && last.train_margin, 3)],
  ];
  return html`<div class="card" data-testid="dpo-rewards">
    <h2>Rewards <span class="muted small">step ${last ? last.step : "—"}</span></h2>
    <dl class="details">${rows.map(([k, v]) => html`<div><dt>${k}</dt><dd>${v}</dd></div>`)}</dl>
  </div>`;
}

function Details({ job }) {
  const hp = job.hyperparameters || {};
  const rows = [
    ["Base model", html`<span class="mono">${job.model}</span>`],
    ["Fine-tuned model", job.fine_tuned_model ? html`<span class="mono">${job.fine_tuned_model}</span> <${Copy} text=${job.fine_tuned_model} />` : "—"],
    ["Method", jobMethod(job)],
    ...(jobMethod(job) === "dpo" ? [["Beta", hp.beta ?? "auto"]] : []),
    ["Epochs", hp.n_epochs ?? "auto"],
    ["Batch size", hp.batch_size ?? "auto"],
    ["LR multiplier", hp.learning_rate_multiplier ?? "auto"],
    ["Training file", html`<span class="mono">${job.training_file}</span>`],
    ["Validation file", job.validation_file ? html`<span class="mono">${job.validation_file}</span>` : "—"],
    ["Created", fmtTime(job.created_at)],
    ["Finished", fmtTime(job.finished_at)],
    ["Trained tokens", job.trained_tokens ?? "—"],
    ["Seed", job.seed ?? "—"],
  ];
  // loraforge extensions: the pre-flight estimate (once the files pass) and the memory plan.
  const est = job.estimate;
  if (est) {
    rows.push(["Estimated steps", est.total_steps]);
    if (est.estimated_trained_tokens != null) rows.push(["Estimated trained tokens", est.estimated_trained_tokens]);
    if (est.estimated_duration_seconds != null) rows.push(["Estimated duration", fmtDuration(est.estimated_duration_seconds)]);
  }
  if (job.plan) rows.push(["Plan", html`<span data-testid="job-plan">${job.plan.summary}</span>`]);
  return html`<dl class="details">${rows.map(([k, v]) => html`<div><dt>${k}</dt><dd>${v}</dd></div>`)}</dl>`;
}

function Checkpoints({ checkpoints }) {
  if (checkpoints === "missing") return html`<p class="muted">Checkpoints are not available on this server yet.</p>`;
  if (!checkpoints || !checkpoints.length) return html`<p class="muted">No checkpoints yet.</p>`;
  return html`<table class="table compact" data-testid="checkpoints">
    <thead><tr><th>Step</th><th>Train loss</th><th>Valid loss</th><th>Accuracy</th><th>Model</th><th></th></tr></thead>
    <tbody>${checkpoints.map(
      (c) => html`<tr key=${c.id}>
        <td>${c.step_number}</td>
        <td>${fmtNum(c.metrics && c.metrics.train_loss, 3)}</td>
        <td>${fmtNum(c.metrics && (c.metrics.valid_loss ?? c.metrics.full_valid_loss), 3)}</td>
        <td>${fmtPct(c.metrics && c.metrics.train_mean_token_accuracy)}</td>
        <td class="mono small wrap">${c.fine_tuned_model_checkpoint}</td>
        <td class="nowrap">
          <a href=${`#/playground?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}`}>chat</a>
        </td>
      </tr>`,
    )}</tbody>
  </table>`;
}

function ResultFiles({ ids }) {
  const [info, setInfo] = useState({});
  const [error, setError] = useState(null);
  usePoll(async () => {
    for (const id of ids) if (!info[id]) api(`/files/${id}`).then((f) => setInfo((i) => ({ ...i, [id]: f })), () => {});
  }, 0, [ids.join()]);
  if (!ids.length) return html`<p class="muted">The result file (per-step metrics, CSV) appears when the job finishes.</p>`;
  return html`<ul class="plain">
    ${ids.map(
      (id) => html`<li>
        <button class="btn small" data-testid="result-download" onClick=${() =>
          download(`/files/${id}/content`, (info[id] && info[id].filename) || `${id}.csv`, {
            transform: decodeBase64Csv,
          }).catch(setError)}>
          Download</button>
        <span class="mono small"> ${(info[id] && info[id].filename) || id}</span>
        <span class="muted small"> ${info[id] ? fmtBytes(info[id].bytes) : ""}</span>
      </li>`,
    )}
    <${ErrorBox} error=${error} />
  </ul>`;
}

export function JobDetailPage({ id }) {
  const [job, setJob] = useState(null);
  const [events, setEvents] = useState([]);
  const [checkpoints, setCheckpoints] = useState(null);
  const [error, setError] = useState(null);
  const known = useRef(new Set());

  const refresh = async () => {
    try {
      const j = await api(`/fine_tuning/jobs/${id}`);
      const fresh = await newEvents(id, known.current);
      fresh.forEach((e) => known.current.add(e.id));
      // Pages come newest first and unseen events are newer than the ones shown.
      if (fresh.length) setEvents((old) => [...fresh, ...old]);
      setJob(j);
      setError(null);
      if (checkpoints !== "missing") {
        try {
          setCheckpoints((await api(`/fine_tuning/jobs/${id}/checkpoints`, { params: { limit: 100 } })).data);
        } catch (e) {
          if (e instanceof ApiError && e.missing) setCheckpoints("missing");
        }
      }
    } catch (e) {
      setError(e);
    }
  };
  const finished = job && TERMINAL.includes(job.status);
  usePoll(refresh, finished ? 0 : 1500, [id, finished]);

  if (!job) return error ? html`<${ErrorBox} error=${error} />` : html`<p class="muted">Loading…</p>`;
  const rows = metricRows(events);
  const last = rows[rows.length - 1];
  const eta = job.estimated_finish ? job.estimated_finish - Date.now() / 1000 : null;
  const note = job.validation_file ? null : "no validation file";
  // The job's W&B run, from the event the worker writes once the run has started.
  const wandb = events.find((e) => e.data && "wandb_run_id" in e.data);
  return html`<section data-testid="job-detail" data-status=${job.status}>
    <div class="page-head">
      <div>
        <div class="muted small"><a href="#/jobs">Fine-tuning</a> / job</div>
        <h1 class="mono">${job.id} <${StatusBadge} status=${job.status} /></h1>
        ${job.user_provided_suffix && html`<p class="muted">${job.user_provided_suffix}</p>`}
      </div>
      <${Actions} job=${job} onChange=${setJob} />
    </div>
    <${ErrorBox} error=${error} />
    ${job.error && job.error.message && html`<${ErrorBox} error=${job.error} title="The job failed" />`}
    ${last && last.total &&
    html`<div class="card row-card">
      <${ProgressBar} value=${last.step} total=${last.total} label=${`step ${last.step} / ${last.total}`} />
      <span class="muted small nowrap">${!finished && eta !== null ? `ETA ${fmtDuration(eta)}` : ""}</span>
    </div>`}
    ${jobMethod(job) === "dpo"
      ? html`<div class="grid2">
            <${MetricChart} title="DPO loss" rows=${rows} keys=${["train_loss", "valid_loss"]} note=${note} testid="chart-loss" />
            <${MetricChart} title="Reward accuracy" rows=${rows} keys=${["train_reward_acc", "valid_reward_acc"]} percent
              note=${note} testid="chart-reward-accuracy" />
          </div>
          <div class="grid2">
            <${MetricChart} title="Reward margin (chosen − rejected)" rows=${rows} keys=${["train_margin", "valid_margin"]}
              note=${note} testid="chart-reward-margin" />
            <${DpoRewards} last=${last} />
          </div>`
      : html`<div class="grid2">
          <${MetricChart} title="Loss" rows=${rows} keys=${["train_loss", "valid_loss"]} note=${note} testid="chart-loss" />
          <${MetricChart} title="Token accuracy" rows=${rows} keys=${["train_acc", "valid_acc"]} percent note=${note}
            testid="chart-accuracy" />
        </div>`}
    ${wandb &&
    html`<div class="card row-card" data-testid="wandb-run">
      <span>Weights & Biases run</span>
      ${wandb.data.wandb_run_url
        ? html`<a href=${wandb.data.wandb_run_url} target="_blank" rel="noopener">${wandb.data.wandb_run_url}</a>`
        : html`<span class="muted small">${wandb.data.wandb_run_id}, logged offline on the worker (wandb sync)</span>`}
    </div>`}
    <div class="grid2">
      <div class="card"><h2>Details</h2><${Details} job=${job} /></div>
      <div class="card">
        <h2>Checkpoints</h2><${Checkpoints} checkpoints=${checkpoints} />
        <h2>Result files</h2><${ResultFiles} ids=${job.result_files || []} />
        <h2>Export</h2>
        ${job.fine_tuned_model
          ? html`<${ExportButton} model=${job.fine_tuned_model} />`
          : html`<p class="muted">The adapter can be exported once the job succeeds.</p>`}
      </div>
    </div>
    <div class="card">
      <h2>Events</h2>
      <ol class="events" data-testid="events">
        ${events.map(
          (e) => html`<li key=${e.id} class=${`level-${e.level} type-${e.type}`}>
            <span class="muted small nowrap">${fmtTime(e.created_at)}</span>
            <span class="ev-msg">${e.message}</span>
          </li>`,
        )}
      </ol>
    </div>
  </section>`;
}
