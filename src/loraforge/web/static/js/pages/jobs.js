// Fine-tuning: the jobs table (id, base model, method, created, status, metrics), polled live.
import { useState } from "preact/hooks";
import { api } from "../api.js";
import { html, ErrorBox, StatusBadge, TERMINAL, fmtAgo, fmtNum, fmtPct, jobMethod, usePoll } from "../ui.js";

// Latest metrics per job; a finished job's metrics never change, so they are fetched once.
const metricsCache = new Map();

async function latestMetrics(job) {
  const cached = metricsCache.get(job.id);
  if (cached && cached.final) return cached.data;
  const events = await api(`/fine_tuning/jobs/${job.id}/events`, { params: { limit: 50 } });
  const last = events.data.find((e) => e.type === "metrics" && e.data);
  const data = last ? last.data : null;
  metricsCache.set(job.id, { data, final: TERMINAL.includes(job.status) });
  return data;
}

function Metrics({ m }) {
  if (!m) return html`<span class="muted">—</span>`;
  return html`<span class="metrics">
    <span title="training loss">loss ${fmtNum(m.train_loss, 3)}</span>
    ${m.valid_loss !== undefined && html`<span title="validation loss"> · val ${fmtNum(m.valid_loss, 3)}</span>`}
    ${m.train_mean_token_accuracy !== undefined &&
    html`<span title="token accuracy"> · acc ${fmtPct(m.train_mean_token_accuracy)}</span>`}
    ${m.total_steps && m.step < m.total_steps ? html`<span class="muted"> · step ${m.step}/${m.total_steps}</span>` : null}
  </span>`;
}

export function JobsPage() {
  const [jobs, setJobs] = useState(null);
  const [metrics, setMetrics] = useState({});
  const [hasMore, setHasMore] = useState(false);
  const [limit, setLimit] = useState(20);
  const [error, setError] = useState(null);

  const refresh = async () => {
    try {
      const page = await api("/fine_tuning/jobs", { params: { limit } });
      setJobs(page.data);
      setHasMore(page.has_more);
      setError(null);
      const pairs = await Promise.all(page.data.map(async (j) => [j.id, await latestMetrics(j).catch(() => null)]));
      setMetrics(Object.fromEntries(pairs));
    } catch (e) {
      setError(e);
    }
  };
  const active = jobs && jobs.some((j) => !TERMINAL.includes(j.status));
  // Poll fast while something trains, slowly otherwise (new jobs from the SDK or CLI show up too).
  usePoll(refresh, active ? 2000 : 8000, [limit, active]);

  return html`<section>
    <div class="page-head">
      <div>
        <h1>Fine-tuning</h1>
        <p class="muted">Jobs of your organization, newest first. Status updates live.</p>
      </div>
      <a class="btn primary" href="#/jobs/new" data-testid="create-job">+ Create new job</a>
    </div>
    <${ErrorBox} error=${error} />
    ${jobs === null
      ? html`<p class="muted">Loading…</p>`
      : !jobs.length
        ? html`<div class="empty card">No fine-tuning jobs yet. <a href="#/jobs/new">Create one</a> from a JSONL file of chat examples.</div>`
        : html`<table class="table" data-testid="jobs-table">
            <thead>
              <tr><th>Job</th><th>Base model</th><th>Method</th><th>Created</th><th>Status</th><th>Metrics</th></tr>
            </thead>
            <tbody>
              ${jobs.map(
                (j) => html`<tr key=${j.id} data-job=${j.id} class="row-link" onClick=${() => (location.hash = `#/jobs/${j.id}`)}>
                  <td>
                    <a href=${`#/jobs/${j.id}`} class="mono">${j.id}</a>
                    ${j.user_provided_suffix && html`<div class="muted small">${j.user_provided_suffix}</div>`}
                  </td>
                  <td class="mono small">${j.model}</td>
                  <td>${jobMethod(j)}</td>
                  <td title=${new Date(j.created_at * 1000).toISOString()}>${fmtAgo(j.created_at)}</td>
                  <td><${StatusBadge} status=${j.status} /></td>
                  <td><${Metrics} m=${metrics[j.id]} /></td>
                </tr>`,
              )}
            </tbody>
          </table>
          ${hasMore && html`<button class="btn" onClick=${() => setLimit(limit + 20)}>Show more</button>`}`}
  </section>`;
}
