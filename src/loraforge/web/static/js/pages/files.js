// Files: upload with progress (chunked through /v1/uploads for large files), list, download, delete.
import { useState } from "preact/hooks";
import { api, decodeBase64Csv, download, uploadFile } from "../api.js";
import { html, DropZone, ErrorBox, ProgressBar, fmtAgo, fmtBytes, lineProblems, usePoll } from "../ui.js";

const PURPOSES = ["fine-tune", "batch", "user_data", "assistants", "vision", "evals"];

function FileStatus({ f }) {
  const status = f.status || "processed";
  if (status !== "error" || !f.status_details) {
    return html`<span class=${`badge file-${status}`} title=${f.status_details || ""}>${status}</span>`;
  }
  // The server's validation verdict, line by line.
  const { head, items } = lineProblems(f.status_details);
  return html`<span class="badge file-error">error</span>
    <div class="small error-text">${head}
      ${items.map((p) => html`<div><span class="pill pill-warn">line ${p.line}</span> ${p.text}</div>`)}
    </div>`;
}

export function FilesPage() {
  const [files, setFiles] = useState(null);
  const [file, setFile] = useState(null);
  const [purpose, setPurpose] = useState("fine-tune");
  const [progress, setProgress] = useState(null);
  const [last, setLast] = useState(null);
  const [error, setError] = useState(null);

  const refresh = async () => {
    try {
      setFiles((await api("/files", { params: { limit: 200 } })).data);
    } catch (e) {
      setError(e);
    }
  };
  // Re-poll while a file is still being validated (status "uploaded").
  const pending = files && files.some((f) => f.status === "uploaded");
  usePoll(refresh, pending ? 1500 : 0, [pending]);

  const upload = async () => {
    setError(null);
    setLast(null);
    setProgress({ value: 0, total: file.size });
    try {
      const res = await uploadFile(file, purpose, (value, total) => setProgress({ value, total }));
      setLast(res);
      setFile(null);
      await refresh();
    } catch (e) {
      setError(e);
    } finally {
      setProgress(null);
    }
  };

  // Result files are base64 CSV on the wire (as OpenAI's); the user gets the CSV.
  const save = (f) =>
    download(`/files/${f.id}/content`, f.filename, {
      transform: f.purpose === "fine-tune-results" ? decodeBase64Csv : undefined,
    }).catch(setError);

  const remove = async (f) => {
    if (!confirm(`Delete ${f.filename} (${f.id})?`)) return;
    try {
      await api(`/files/${f.id}`, { method: "DELETE" });
      await refresh();
    } catch (e) {
      setError(e);
    }
  };

  return html`<section>
    <div class="page-head">
      <div>
        <h1>Files</h1>
        <p class="muted">Training and validation data (JSONL), and the result files of finished jobs.</p>
      </div>
    </div>
    <div class="card upload-card">
      <${DropZone} file=${file} onFile=${setFile} testid="upload-input" />
      <div class="actions">
        <label class="inline">Purpose
          <select value=${purpose} onChange=${(e) => setPurpose(e.target.value)}>
            ${PURPOSES.map((p) => html`<option value=${p}>${p}</option>`)}
          </select>
        </label>
        <button class="btn primary" disabled=${!file || Boolean(progress)} onClick=${upload} data-testid="upload-submit">Upload</button>
      </div>
      ${progress &&
      html`<${ProgressBar} value=${progress.value} total=${progress.total}
        label=${`${fmtBytes(progress.value)} / ${fmtBytes(progress.total)}`} />`}
      ${last && html`<div class="muted small" data-testid="upload-done">Uploaded <span class="mono">${last.file.id}</span>
        ${last.chunked ? " in parts (uploads API)" : ""}</div>`}
      <${ErrorBox} error=${error} />
    </div>
    ${files === null
      ? html`<p class="muted">Loading…</p>`
      : !files.length
        ? html`<div class="empty card">No files yet.</div>`
        : html`<table class="table" data-testid="files-table">
            <thead><tr><th>File</th><th>Name</th><th>Purpose</th><th>Size</th><th>Created</th><th>Status</th><th></th></tr></thead>
            <tbody>${files.map(
              (f) => html`<tr key=${f.id} data-file=${f.id}>
                <td class="mono small">${f.id}</td>
                <td>${f.filename}</td>
                <td>${f.purpose}</td>
                <td class="nowrap">${fmtBytes(f.bytes)}</td>
                <td class="nowrap">${fmtAgo(f.created_at)}</td>
                <td><${FileStatus} f=${f} /></td>
                <td class="nowrap right">
                  <button class="btn-link" onClick=${() => save(f)}>download</button>
                  <button class="btn-link danger" data-action="delete" onClick=${() => remove(f)}>delete</button>
                </td>
              </tr>`,
            )}</tbody>
          </table>`}
  </section>`;
}
