// Playground: streaming chat (SSE from /v1/chat/completions) with a base model, a fine-tuned
// model or one of its checkpoints; system prompt, temperature and max tokens.
import { useEffect, useRef, useState } from "preact/hooks";
import { api, ApiError, streamChat } from "../api.js";
import { html, ErrorBox } from "../ui.js";

/** Base and fine-tuned models, plus the checkpoints of recent succeeded jobs. */
async function loadChoices() {
  const models = (await api("/models")).data;
  const groups = {
    // Base models an engine of this installation serves (tagged "servable"); fine-tuned ones have a parent.
    base: models.filter((m) => !m.parent && (m.tags || []).includes("servable")).map((m) => m.id),
    tuned: models.filter((m) => m.parent && !/:ckpt-step-\d+$/.test(m.id)).map((m) => m.id),
    checkpoints: models.filter((m) => /:ckpt-step-\d+$/.test(m.id)).map((m) => m.id),
  };
  try {
    const jobs = (await api("/fine_tuning/jobs", { params: { limit: 10 } })).data.filter((j) => j.status === "succeeded");
    for (const job of jobs) {
      const page = await api(`/fine_tuning/jobs/${job.id}/checkpoints`, { params: { limit: 10 } });
      for (const c of page.data) {
        if (!groups.checkpoints.includes(c.fine_tuned_model_checkpoint)) groups.checkpoints.push(c.fine_tuned_model_checkpoint);
      }
    }
  } catch (e) {
    if (!(e instanceof ApiError)) throw e; // no checkpoints endpoint yet: base and fine-tuned only
  }
  return groups;
}

export function PlaygroundPage({ initialModel }) {
  const [choices, setChoices] = useState(null);
  const [model, setModel] = useState(initialModel || "");
  const [system, setSystem] = useState("");
  const [temperature, setTemperature] = useState(0.7);
  const [maxTokens, setMaxTokens] = useState(256);
  const [messages, setMessages] = useState([]);
  const [input, setInput] = useState("");
  const [streaming, setStreaming] = useState(null);
  const [usage, setUsage] = useState(null);
  const [error, setError] = useState(null);
  const abort = useRef(null);
  const log = useRef(null);

  useEffect(() => {
    loadChoices()
      .then((c) => {
        setChoices(c);
        if (!initialModel) setModel(c.tuned[0] || c.base[0] || "");
      })
      .catch(setError);
    return () => abort.current && abort.current.abort();
  }, []);
  useEffect(() => {
    if (log.current) log.current.scrollTop = log.current.scrollHeight;
  }, [messages, streaming]);

  const send = async (e) => {
    e.preventDefault();
    const text = input.trim();
    if (!text || streaming !== null) return;
    const history = [...messages, { role: "user", content: text }];
    setMessages(history);
    setInput("");
    setError(null);
    setUsage(null);
    setStreaming("");
    abort.current = new AbortController();
    let reply = "";
    let finish = null;
    try {
      const body = {
        model,
        messages: [...(system.trim() ? [{ role: "system", content: system }] : []), ...history],
        temperature: Number(temperature),
        max_tokens: Number(maxTokens),
        stream_options: { include_usage: true },
      };
      for await (const chunk of streamChat(body, abort.current.signal)) {
        if (chunk.usage) setUsage(chunk.usage);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          setStreaming(reply);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    } catch (err) {
      if (err.name !== "AbortError") setError(err);
      finish = finish || "stopped";
    }
    setMessages([...history, { role: "assistant", content: reply, finish }]);
    setStreaming(null);
  };

  const options = (label, ids) =>
    ids.length ? html`<optgroup label=${label}>${ids.map((id) => html`<option value=${id}>${id}</option>`)}</optgroup>` : null;
  const listed = choices ? [...choices.base, ...choices.tuned, ...choices.checkpoints] : [];
  return html`<section class="playground">
    <aside class="card settings">
      <h2>Settings</h2>
      <label class="field"><span class="label">Model</span>
        <select name="model" value=${model} onChange=${(e) => setModel(e.target.value)} data-testid="pg-model">
          ${model && !listed.includes(model) && html`<option value=${model}>${model}</option>`}
          ${choices && options("Fine-tuned", choices.tuned)}
          ${choices && options("Checkpoints", choices.checkpoints)}
          ${choices && options("Base models", choices.base)}
        </select>
      </label>
      <label class="field"><span class="label">System prompt</span>
        <textarea name="system" rows="4" value=${system} onInput=${(e) => setSystem(e.target.value)}
          placeholder="You are a helpful assistant." data-testid="pg-system"></textarea>
      </label>
      <label class="field"><span class="label">Temperature <span class="muted">${Number(temperature).toFixed(2)}</span></span>
        <input type="range" min="0" max="2" step="0.05" value=${temperature} name="temperature"
          onInput=${(e) => setTemperature(e.target.value)} data-testid="pg-temperature" />
      </label>
      <label class="field"><span class="label">Max tokens</span>
        <input type="number" min="1" max="4096" value=${maxTokens} name="max_tokens" onInput=${(e) => setMaxTokens(e.target.value)} />
      </label>
      <button class="btn" type="button" onClick=${() => { setMessages([]); setUsage(null); }}>Clear chat</button>
    </aside>
    <div class="card chat">
      <div class="chat-log" ref=${log} data-testid="chat-log">
        ${!messages.length && streaming === null && html`<p class="muted center">Send a message to chat with <span class="mono">${model || "a model"}</span>.</p>`}
        ${messages.map(
          (m, i) => html`<div key=${i} class=${`msg msg-${m.role}`} data-role=${m.role}>
            <div class="msg-role">${m.role}</div>
            <div class="msg-text">${m.content}</div>
            ${m.finish && m.finish !== "stop" && html`<div class="muted small">finish: ${m.finish}</div>`}
          </div>`,
        )}
        ${streaming !== null && html`<div class="msg msg-assistant streaming" data-role="assistant-streaming">
          <div class="msg-role">assistant</div><div class="msg-text">${streaming}<span class="cursor">▍</span></div></div>`}
      </div>
      <${ErrorBox} error=${error} />
      <form class="chat-input" onSubmit=${send}>
        <textarea rows="2" value=${input} placeholder="Type a message (Enter to send, Shift+Enter for a new line)"
          data-testid="pg-input" onInput=${(e) => setInput(e.target.value)}
          onKeyDown=${(e) => { if (e.key === "Enter" && !e.shiftKey) send(e); }}></textarea>
        ${streaming !== null
          ? html`<button class="btn" type="button" onClick=${() => abort.current.abort()}>Stop</button>`
          : html`<button class="btn primary" type="submit" disabled=${!model || !input.trim()} data-testid="pg-send">Send</button>`}
      </form>
      ${usage && html`<div class="muted small usage">tokens: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion</div>`}
    </div>
  </section>`;
}
