// Create job: method (supervised, or DPO with its beta), base model, training file (+ optional
// validation file), nickname, batch size, learning-rate multiplier, epochs -> Create. Files are checked in the browser first; the
// server's own verdicts (upload rejection, file validation, job creation) are shown by line.
import { useEffect, useState } from "preact/hooks";
import { api, ApiError, uploadFile } from "../api.js";
import { checkTrainingFile } from "../jsonl.js";
import { html, DropZone, ErrorBox, Notice, ProgressBar, fmtBytes, fmtDuration } from "../ui.js";

// A File already uploaded in this page visit is not uploaded again (dry run, then create).
const uploaded = new WeakMap();

/** Wait (briefly) for the server's file validation: status uploaded -> processed | error. */
async function waitProcessed(file) {
  const deadline = Date.now() + 15000;
  while (file.status === "uploaded" && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 500));
    file = await api(`/files/${file.id}`);
  }
  if (file.status === "error") {
    throw Object.assign(new Error(file.status_details || "The server rejected the file."), { param: file.id });
  }
  return file;
}

function FileField({ label, state, setState, files, optional, testid, method }) {
  const choose = async (file) => {
    setState({ file, check: null, existing: "" });
    setState({ file, check: await checkTrainingFile(file, method), existing: "" });
  };
  // The method changed after a file was chosen: check it again by the other format's rules.
  useEffect(() => {
    if (state.file) checkTrainingFile(state.file, method).then((check) => setState({ ...state, check }));
  }, [method]);
  const what = method === "dpo" ? "preference examples (DPO)" : "chat examples";
  const check = state.check;
  return html`<div class="field">
    <div class="label">${label}${optional && html` <span class="muted">(optional)</span>`}</div>
    <${DropZone} file=${state.file} onFile=${choose} accept=".jsonl" testid=${testid}
      label=${`Drop a .jsonl file of ${what} here, or click to choose`} />
    ${check &&
    (check.problems.length
      ? html`<div class="check bad" data-testid=${`${testid}-problems`}>
          <strong>${check.problems.length}${check.truncated ? "+" : ""} problem(s) found in the browser:</strong>
          <ul>${check.problems.map((p) => html`<li>${p.line ? html`<span class="pill pill-warn">line ${p.line}</span> ` : ""}${p.message}</li>`)}</ul>
        </div>`
      : html`<div class="check good" data-testid=${`${testid}-ok`}>
          ✓ ${check.examples} examples look valid${check.partial ? " (first 64 MB checked)" : ""}
        </div>`)}
    ${files.length > 0 &&
    html`<div class="or-existing">
      or use an uploaded file:
      <select value=${state.existing} onChange=${(e) => setState({ file: null, check: null, existing: e.target.value })}>
        <option value="">—</option>
        ${files.map((f) => html`<option value=${f.id}>${f.filename} · ${f.id} · ${fmtBytes(f.bytes)}</option>`)}
      </select>
    </div>`}
  </div>`;
}

/** The server's pre-flight for the job: its verdict, the resolved settings and the estimate. */
function DryRunResult({ result }) {
  if (result.valid === false) return html`<${ErrorBox} error=${result.error || {}} title="Dry run: the job would fail" />`;
  const e = result.estimate || {};
  const hp = result.hyperparameters || {};
  const reports = [result.training_file_report, result.validation_file_report].filter(Boolean);
  const warnings = reports.flatMap((r) => r.warnings || []);
  const rows = [
    ["Examples", e.n_examples],
    ["Epochs", hp.n_epochs],
    ["Batch size", hp.batch_size],
    ["LR multiplier", hp.learning_rate_multiplier],
    ["Steps", e.total_steps],
    ["Trained tokens", e.estimated_trained_tokens],
    ["Estimated time", e.estimated_duration_seconds !== undefined ? fmtDuration(e.estimated_duration_seconds) : undefined],
  ].filter(([, v]) => v !== undefined && v !== null);
  return html`<div class="notice notice-ok" data-testid="dry-run-result">
    <strong>Dry run passed</strong> — nothing was queued.
    <dl class="details inline">${rows.map(([k, v]) => html`<div><dt>${k}</dt><dd>${v}</dd></div>`)}</dl>
    ${warnings.length > 0 &&
    html`<ul class="error-lines">${warnings.map(
      (w) => html`<li>${w.line ? html`<span class="pill pill-warn">line ${w.line}</span> ` : ""}${w.message}</li>`,
    )}</ul>`}
  </div>`;
}

function numberOrAuto(value, parse) {
  const v = String(value).trim();
  return v === "" ? "auto" : parse(v);
}

export function CreateJobPage() {
  const [models, setModels] = useState(null); // null until the list is in: the form then picks the default
  const [files, setFiles] = useState([]);
  const [model, setModel] = useState("");
  const [method, setMethod] = useState("supervised");
  const [beta, setBeta] = useState("");
  const [train, setTrain] = useState({ file: null, check: null, existing: "" });
  const [valid, setValid] = useState({ file: null, check: null, existing: "" });
  const [suffix, setSuffix] = useState("");
  const [batch, setBatch] = useState("");
  const [lr, setLr] = useState("");
  const [epochs, setEpochs] = useState("");
  const [progress, setProgress] = useState(null);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const [dryRun, setDryRun] = useState(null);

  useEffect(() => {
    api("/models")
      .then((res) => {
        // Only what a worker pool of this installation can train ("fine-tunable"): the first is the default.
        const tunable = res.data.filter((m) => (m.tags || []).includes("fine-tunable"));
        setModels(tunable);
        if (tunable.length) setModel(tunable[0].id);
      })
      .catch((e) => {
        setModels([]);
        setError(e);
      });
    api("/files", { params: { purpose: "fine-tune", limit: 100 } })
      .then((res) => setFiles(res.data.filter((f) => f.status !== "error")))
      .catch(() => {});
  }, []);

  const resolveFile = async (state, label) => {
    if (state.existing) return state.existing;
    if (!state.file) return null;
    if (state.check && state.check.problems.length) {
      throw new Error(`The ${label} has problems (see above); fix the file and choose it again.`);
    }
    if (uploaded.has(state.file)) return uploaded.get(state.file);
    setProgress({ label: `Uploading ${state.file.name}`, value: 0, total: state.file.size });
    const { file } = await uploadFile(state.file, "fine-tune", (value, total) =>
      setProgress({ label: `Uploading ${state.file.name}`, value, total }),
    );
    setProgress({ label: `Validating ${state.file.name} on the server`, value: 1, total: 1 });
    const checked = await waitProcessed(file);
    uploaded.set(state.file, checked.id);
    return checked.id;
  };

  const body = async () => {
    const hyperparameters = {
      batch_size: numberOrAuto(batch, (v) => parseInt(v, 10)),
      learning_rate_multiplier: numberOrAuto(lr, parseFloat),
      n_epochs: numberOrAuto(epochs, (v) => parseInt(v, 10)),
    };
    const training = await resolveFile(train, "training file");
    if (!training) throw new Error("Choose a training file.");
    const validation = await resolveFile(valid, "validation file");
    if (method === "dpo") hyperparameters.beta = numberOrAuto(beta, parseFloat);
    const req = { model, training_file: training, method: { type: method, [method]: { hyperparameters } } };
    if (validation) req.validation_file = validation;
    if (suffix.trim()) req.suffix = suffix.trim();
    return req;
  };

  const submit = async (e, asDryRun = false) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    setDryRun(null);
    try {
      const req = await body();
      setProgress(null);
      if (asDryRun) {
        try {
          setDryRun({ result: await api("/fine_tuning/jobs", { method: "POST", body: { ...req, dry_run: true } }) });
        } catch (err) {
          if (err instanceof ApiError && err.param === "dry_run") setDryRun({ unavailable: true });
          else throw err;
        }
        return;
      }
      const job = await api("/fine_tuning/jobs", { method: "POST", body: req });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
      setProgress(null);
    }
  };

  if (models === null) return html`<section class="narrow"><p class="muted" data-testid="create-loading">Loading models…</p></section>`;

  return html`<section class="narrow">
    <div class="page-head">
      <div>
        <h1>Create a fine-tuning job</h1>
        <p class="muted">LoRA fine-tuning in OpenAI's JSONL formats: supervised on chat examples, or DPO on
          preference pairs (best started from a supervised fine-tune of the same base).</p>
      </div>
      <a class="btn" href="#/jobs">Cancel</a>
    </div>
    <form class="card form" onSubmit=${(e) => submit(e)} data-testid="create-form">
      <div class="grid3">
        <label class="field"><span class="label">Method</span>
          <select name="method" value=${method} onChange=${(e) => setMethod(e.target.value)} data-testid="method">
            <option value="supervised">Supervised</option>
            <option value="dpo">DPO (preference pairs)</option>
          </select></label>
        ${method === "dpo" &&
        html`<label class="field"><span class="label">Beta <span class="muted">(DPO)</span></span>
          <input name="beta" type="number" min="0.001" max="2" step="any" placeholder="auto (0.1)" value=${beta}
            onInput=${(e) => setBeta(e.target.value)} data-testid="beta" /></label>`}
      </div>
      <label class="field">
        <span class="label">Base model</span>
        <select name="model" value=${model} onChange=${(e) => setModel(e.target.value)} required>
          ${models.map((m) => html`<option value=${m.id}>${m.id}${m.context_length ? ` · ${m.context_length} ctx` : ""}</option>`)}
        </select>
      </label>
      <${FileField} label="Training file" state=${train} setState=${setTrain} files=${files} method=${method} testid="training-file" />
      <${FileField} label="Validation file" state=${valid} setState=${setValid} files=${files} method=${method} optional
        testid="validation-file" />
      <label class="field">
        <span class="label">Nickname <span class="muted">(optional: becomes part of the model name)</span></span>
        <input name="suffix" maxlength="64" pattern="[A-Za-z0-9_.\\-]+" placeholder="e.g. tickets" value=${suffix}
          onInput=${(e) => setSuffix(e.target.value)} />
      </label>
      <div class="grid3">
        <label class="field"><span class="label">Batch size</span>
          <input name="batch_size" type="number" min="1" max="256" step="1" placeholder="auto" value=${batch} onInput=${(e) => setBatch(e.target.value)} /></label>
        <label class="field"><span class="label">Learning-rate multiplier</span>
          <input name="learning_rate_multiplier" type="number" min="0.0001" max="100" step="any" placeholder="auto" value=${lr} onInput=${(e) => setLr(e.target.value)} /></label>
        <label class="field"><span class="label">Epochs</span>
          <input name="n_epochs" type="number" min="1" max="50" step="1" placeholder="auto" value=${epochs} onInput=${(e) => setEpochs(e.target.value)} /></label>
      </div>
      ${progress && html`<div class="field"><div class="muted small">${progress.label}</div>
        <${ProgressBar} value=${progress.value} total=${progress.total}
          label=${progress.total > 1 ? `${fmtBytes(progress.value)} / ${fmtBytes(progress.total)}` : "…"} /></div>`}
      <${ErrorBox} error=${error} title="The job was not created" />
      ${dryRun && dryRun.unavailable && html`<${Notice} kind="warn">Dry run is not available on this server yet.</${Notice}>`}
      ${dryRun && dryRun.result && html`<${DryRunResult} result=${dryRun.result} />`}
      <div class="actions">
        <button class="btn" type="button" disabled=${busy} onClick=${(e) => submit(e, true)} data-testid="dry-run">
          Check (dry run)</button>
        <button class="btn primary" type="submit" disabled=${busy || !model} data-testid="create-submit">${busy ? "Working…" : "Create"}</button>
      </div>
    </form>
  </section>`;
}
