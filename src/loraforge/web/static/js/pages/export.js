// Export a fine-tuned model as a tar: the PEFT adapter pair, the adapter merged into the base, or
// GGUF files (merged f16 and q8_0, the LoRA, an Ollama Modelfile).
import { useState } from "preact/hooks";
import { ApiError, download, modelPath } from "../api.js";
import { html, ErrorBox, Notice, ProgressBar, fmtBytes } from "../ui.js";

export function ExportButton({ model, compact = false }) {
  const [format, setFormat] = useState("peft");
  const [progress, setProgress] = useState(null);
  const [result, setResult] = useState(null);
  const [error, setError] = useState(null);
  const [missing, setMissing] = useState(false);

  const run = async () => {
    setError(null);
    setResult(null);
    setProgress({ value: 0, total: 0 });
    const fallback = `${model.replace(/[^A-Za-z0-9_.-]+/g, "_")}-${format}.tar`;
    try {
      setResult(
        await download(`/models/${modelPath(model)}/export`, fallback, {
          params: { format },
          onProgress: (value, total) => setProgress({ value, total }),
        }),
      );
    } catch (e) {
      // Before the export endpoint exists, the model route answers "model `…/export` not found".
      if (e instanceof ApiError && (e.missing || (e.status === 404 && /\/export/.test(e.message)))) setMissing(true);
      else setError(e);
    } finally {
      setProgress(null);
    }
  };

  return html`<div class=${compact ? "export compact" : "export"}>
    <div class="actions">
      <select value=${format} onChange=${(e) => setFormat(e.target.value)} aria-label="export format">
        <option value="peft">PEFT adapter</option>
        <option value="merged">merged model</option>
        <option value="gguf">GGUF (llama.cpp, Ollama)</option>
      </select>
      <button class="btn small" data-testid="export-download" disabled=${Boolean(progress)} onClick=${run}>
        ${progress ? "Exporting…" : "Download .tar"}
      </button>
    </div>
    ${progress &&
    !compact &&
    html`<${ProgressBar} value=${progress.value} total=${progress.total || progress.value + 1}
      label=${fmtBytes(progress.value)} />`}
    ${result && html`<span class="muted small" data-testid="export-done">saved ${result.name} (${fmtBytes(result.bytes)})</span>`}
    ${missing && html`<${Notice} kind="warn">Export is not available on this server yet.</${Notice}>`}
    <${ErrorBox} error=${error} />
  </div>`;
}
