// Models: the base models that can be fine-tuned, and the organization's fine-tuned models
// (chat, export, delete).
import { useState } from "preact/hooks";
import { api, modelPath } from "../api.js";
import { ExportButton } from "./export.js";
import { html, Copy, ErrorBox, fmtAgo, usePoll } from "../ui.js";

const isBase = (m) => (m.tags || []).includes("base") || !m.parent;
const has = (m, tag) => (m.tags || []).includes(tag);
const CKPT = /:ckpt-step-(\d+)$/;

/** Fine-tuned models, each followed by its checkpoints (latest step first). */
function grouped(tuned) {
  const ckpts = tuned.filter((m) => CKPT.test(m.id));
  const step = (m) => Number(CKPT.exec(m.id)[1]);
  const rows = [];
  for (const m of tuned.filter((x) => !CKPT.test(x.id))) {
    rows.push(m);
    const own = ckpts.filter((c) => c.id.replace(CKPT, "") === m.id).sort((a, b) => step(b) - step(a));
    rows.push(...own.map((c) => ({ ...c, checkpoint: step(c) })));
  }
  // Checkpoints whose model is gone (deleted) still get a row.
  const shown = new Set(rows.map((r) => r.id));
  rows.push(...ckpts.filter((c) => !shown.has(c.id)).map((c) => ({ ...c, checkpoint: step(c) })));
  return rows;
}

export function ModelsPage() {
  const [models, setModels] = useState(null);
  const [error, setError] = useState(null);
  const refresh = async () => {
    try {
      setModels((await api("/models")).data);
    } catch (e) {
      setError(e);
    }
  };
  usePoll(refresh, 0);

  const remove = async (m) => {
    if (!confirm(`Delete ${m.id}? Chat requests for it will fail afterwards.`)) return;
    try {
      await api(`/models/${modelPath(m.id)}`, { method: "DELETE" });
      await refresh();
    } catch (e) {
      setError(e);
    }
  };

  if (!models) return error ? html`<${ErrorBox} error=${error} />` : html`<p class="muted">Loading…</p>`;
  const base = models.filter(isBase);
  const tuned = grouped(models.filter((m) => !isBase(m)));
  const chat = (id) => `#/playground?model=${encodeURIComponent(id)}`;
  return html`<section>
    <div class="page-head"><div><h1>Models</h1><p class="muted">Base models you can fine-tune, and your fine-tuned models.</p></div></div>
    <${ErrorBox} error=${error} />
    <h2>Base models</h2>
    <table class="table" data-testid="base-models">
      <thead><tr><th>Model</th><th>Context</th><th>Owner</th><th>Aliases</th><th></th></tr></thead>
      <tbody>${base.map(
        (m) => html`<tr key=${m.id}>
          <td class="mono">${m.id}</td>
          <td>${m.context_length || "—"}</td>
          <td>${m.owned_by}</td>
          <td class="small muted">${(m.aliases || []).join(", ") || "—"}</td>
          <td class="right nowrap" data-testid="base-actions">${has(m, "servable") ? html`<a href=${chat(m.id)}>chat</a>` : html`<span class="muted">not served here</span>`} · ${has(m, "fine-tunable") ? html`<a href="#/jobs/new">fine-tune</a>` : html`<span class="muted">no pool can train it</span>`}</td>
        </tr>`,
      )}</tbody>
    </table>
    <h2>Fine-tuned models</h2>
    ${!tuned.length
      ? html`<div class="empty card">No fine-tuned models yet.</div>`
      : html`<table class="table" data-testid="fine-tuned-models">
          <thead><tr><th>Model</th><th>Base</th><th>Job</th><th>Created</th><th>Export</th><th></th></tr></thead>
          <tbody>${tuned.map(
            (m) => html`<tr key=${m.id} data-model=${m.id} class=${m.checkpoint !== undefined ? "sub-row" : ""}>
              <td class="mono small wrap">
                ${m.checkpoint !== undefined ? html`<span class="muted">↳ checkpoint, step ${m.checkpoint}</span><br />` : null}
                ${m.id} <${Copy} text=${m.id} />
              </td>
              <td class="mono small nowrap">${m.checkpoint !== undefined ? "" : m.parent || m.root || "—"}</td>
              <td class="nowrap">${m.fine_tuning_job ? html`<a class="mono small" href=${`#/jobs/${m.fine_tuning_job}`}>${m.fine_tuning_job}</a>` : "—"}</td>
              <td class="nowrap">${fmtAgo(m.created)}</td>
              <td><${ExportButton} model=${m.id} compact /></td>
              <td class="right nowrap">
                <a href=${chat(m.id)}>chat</a>
                <button class="btn-link danger" data-action="delete" onClick=${() => remove(m)}>delete</button>
              </td>
            </tr>`,
          )}</tbody>
        </table>`}
  </section>`;
}
