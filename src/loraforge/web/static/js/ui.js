// Shared building blocks: the htm template tag, formatting, small components and hooks.
import { h } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import htm from "htm";

export const html = htm.bind(h);

export const TERMINAL = ["succeeded", "failed", "cancelled"];

export function fmtTime(ts) {
  if (!ts) return "—";
  return new Date(ts * 1000).toLocaleString(undefined, {
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
}

export function fmtAgo(ts) {
  if (!ts) return "—";
  const s = Math.round(Date.now() / 1000 - ts);
  if (s < 60) return `${Math.max(s, 0)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return fmtTime(ts);
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function fmtNum(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  if (Math.abs(x) >= 100 || Number.isInteger(x)) return String(Math.round(x * 100) / 100);
  // A converged loss is tiny: 1.27e-6 reads better than 0.00000127.
  if (Math.abs(x) < 1e-3) return Number(x).toExponential(Math.max(digits - 2, 1));
  return Number(x).toPrecision(digits);
}

export const fmtPct = (x) => (x === null || x === undefined ? "—" : `${(x * 100).toFixed(1)}%`);

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "—";
  if (seconds < 60) return `${Math.round(seconds)}s`;
  const m = Math.floor(seconds / 60);
  return m < 60 ? `${m}m ${Math.round(seconds % 60)}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
}

/** The method name of a job ("supervised" when the job predates `method`). */
export const jobMethod = (job) => (job.method && job.method.type) || "supervised";

export function StatusBadge({ status }) {
  return html`<span class=${`badge status-${status}`} data-status=${status}>${status.replace("_", " ")}</span>`;
}

/**
 * Split a server message into its lead and its per-line problems: the API reports a file's
 * problems as "...: line 13: has no assistant message; line 14: ..." (one per line or joined).
 */
export function lineProblems(message) {
  const re = /\bline (\d+):\s*/gi;
  const hits = [];
  let m;
  while ((m = re.exec(message))) hits.push({ start: m.index, line: m[1], from: re.lastIndex });
  if (!hits.length) return { head: message, items: [] };
  const items = hits.map((h, i) => ({
    line: h.line,
    text: message.slice(h.from, i + 1 < hits.length ? hits[i + 1].start : undefined).replace(/[\s;]+$/, ""),
  }));
  return { head: message.slice(0, hits[0].start).replace(/[\s;:.]+$/, ""), items };
}

/** An API error; the lines it names are listed with their numbers so they stand out. */
export function ErrorBox({ error, title }) {
  if (!error) return null;
  const message = error.message || String(error);
  const { head, items } = lineProblems(message);
  const single = !items.length && /\bline (\d+)/i.exec(message);
  return html`<div class="error-box" role="alert">
    ${title && html`<strong>${title}</strong>`}
    <div class="error-message">${head}</div>
    ${items.length > 0 &&
    html`<ul class="error-lines" data-testid="error-lines">
      ${items.map((p) => html`<li><span class="pill pill-warn">line ${p.line}</span> ${p.text}</li>`)}
    </ul>`}
    <div class="error-meta">
      ${single && html`<span class="pill pill-warn">line ${single[1]}</span>`}
      ${error.code && html`<span class="pill">code: ${error.code}</span>`}
      ${error.param && html`<span class="pill">param: ${error.param}</span>`}
      ${error.status ? html`<span class="pill">HTTP ${error.status}</span>` : null}
    </div>
  </div>`;
}

export function Notice({ children, kind = "info" }) {
  return html`<div class=${`notice notice-${kind}`}>${children}</div>`;
}

export function ProgressBar({ value, total, label }) {
  const pct = total ? Math.min(100, (100 * value) / total) : 0;
  return html`<div class="progress" role="progressbar" aria-valuenow=${Math.round(pct)} aria-valuemin="0" aria-valuemax="100">
    <div class="progress-fill" style=${{ width: `${pct}%` }}></div>
    <span class="progress-label">${label || `${Math.round(pct)}%`}</span>
  </div>`;
}

export function Copy({ text }) {
  const [done, setDone] = useState(false);
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(text);
      setDone(true);
      setTimeout(() => setDone(false), 1200);
    } catch {
      /* clipboard needs a secure context; the text stays selectable */
    }
  };
  return html`<button class="btn-link small" type="button" onClick=${copy} title="Copy">${done ? "copied" : "copy"}</button>`;
}

/** Run `fn` now and every `ms` (skipping ticks while one is in flight or the tab is hidden). */
export function usePoll(fn, ms, deps = []) {
  const saved = useRef(fn);
  saved.current = fn;
  useEffect(() => {
    let alive = true;
    let busy = false;
    const tick = async () => {
      if (busy || !alive || document.hidden) return;
      busy = true;
      try {
        await saved.current();
      } finally {
        busy = false;
      }
    };
    tick();
    const id = ms ? setInterval(tick, ms) : null;
    return () => {
      alive = false;
      if (id) clearInterval(id);
    };
  }, [ms, ...deps]);
}

/** A file drop zone (click to choose, or drag a file onto it). */
export function DropZone({ file, onFile, accept, label, testid }) {
  const [over, setOver] = useState(false);
  const input = useRef(null);
  const drop = (e) => {
    e.preventDefault();
    setOver(false);
    if (e.dataTransfer.files.length) onFile(e.dataTransfer.files[0]);
  };
  return html`<div
    class=${`dropzone${over ? " over" : ""}${file ? " has-file" : ""}`}
    onClick=${() => input.current.click()}
    onDragOver=${(e) => {
      e.preventDefault();
      setOver(true);
    }}
    onDragLeave=${() => setOver(false)}
    onDrop=${drop}
  >
    <input
      ref=${input}
      type="file"
      accept=${accept}
      data-testid=${testid}
      hidden
      onChange=${(e) => e.target.files.length && onFile(e.target.files[0])}
    />
    ${file
      ? html`<span class="dz-file">${file.name}</span><span class="muted"> · ${fmtBytes(file.size)} · click to change</span>`
      : html`<span class="dz-label">${label || "Drop a file here, or click to choose"}</span>`}
  </div>`;
}
