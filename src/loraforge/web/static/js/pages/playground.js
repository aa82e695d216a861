// Playground: streaming chat (SSE from /v1/chat/completions) with a base model, a fine-tuned
// model or one of its checkpoints; system prompt, temperature, max tokens, and tools: a JSON list
// of OpenAI function definitions. Tool calls the model makes are shown (assembled from the stream's
// delta.tool_calls) and each can be answered with a result, sent back as a "tool" message.
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

/** The tools textarea as a list of tool definitions (empty: none); throws a readable error. */
function parseTools(text) {
  if (!text.trim()) return [];
  let tools;
  try {
    tools = JSON.parse(text);
  } catch (e) {
    throw new Error(`Tools are not valid JSON: ${e.message}`);
  }
  if (!Array.isArray(tools)) tools = [tools];
  for (const t of tools) {
    if (!t || typeof t !== "object" || !t.function || typeof t.function.name !== "string") {
      throw new Error('Each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}.');
    }
  }
  return tools.map((t) => ({ type: "function", ...t }));
}

/** Fold one chunk's delta.tool_calls into the calls so far (by index, as OpenAI's SDKs do). */
function addToolDeltas(calls, deltas) {
  const next = calls.map((c) => ({ ...c, function: { ...c.function } }));
  for (const d of deltas) {
    const call = (next[d.index] = next[d.index] || { id: "", type: "function", function: { name: "", arguments: "" } });
    if (d.id) call.id = d.id;
    if (d.function && d.function.name) call.function.name += d.function.name;
    if (d.function && d.function.arguments) call.function.arguments += d.function.arguments;
  }
  return next;
}

/** Arguments pretty-printed when they are JSON (they should be), else as the model wrote them. */
function prettyArguments(text) {
  try {
    return JSON.stringify(JSON.parse(text));
  } catch {
    return text;
  }
}

/** The tool calls of the last assistant turn that no tool message has answered yet. */
function unansweredCalls(messages) {
  const answered = new Set(messages.filter((m) => m.role === "tool").map((m) => m.tool_call_id));
  for (let i = messages.length - 1; i >= 0; i--) {
    if (messages[i].role === "assistant") return (messages[i].tool_calls || []).filter((c) => !answered.has(c.id));
  }
  return [];
}

function ToolCalls({ calls }) {
  return html`<div class="tool-calls">${calls.map(
    (c) => html`<div class="tool-call mono" data-testid="tool-call" data-name=${c.function.name} data-arguments=${c.function.arguments}>
      <span class="muted small">${c.id}</span> ${c.function.name}(${prettyArguments(c.function.arguments)})</div>`,
  )}</div>`;
}

export function PlaygroundPage({ initialModel }) {
  const [choices, setChoices] = useState(null);
  const [model, setModel] = useState(initialModel || "");
  const [system, setSystem] = useState("");
  const [temperature, setTemperature] = useState(0.7);
  const [maxTokens, setMaxTokens] = useState(256);
  const [toolsText, setToolsText] = useState("");
  const [messages, setMessages] = useState([]);
  const [input, setInput] = useState("");
  const [streaming, setStreaming] = useState(null); // {content, calls} while a reply streams
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

  const pending = unansweredCalls(messages);

  const send = async (e) => {
    e.preventDefault();
    const text = input.trim();
    if (!text || streaming !== null) return;
    let tools;
    try {
      tools = parseTools(toolsText);
    } catch (err) {
      setError(err);
      return;
    }
    // With a call waiting for its result, the input answers it (a "tool" message).
    const turn = pending.length ? { role: "tool", tool_call_id: pending[0].id, name: pending[0].function.name, content: text } : { role: "user", content: text };
    const history = [...messages, turn];
    setMessages(history);
    setInput("");
    setError(null);
    setUsage(null);
    setStreaming({ content: "", calls: [] });
    abort.current = new AbortController();
    let reply = "";
    let calls = [];
    let finish = null;
    try {
      const body = {
        model,
        messages: [
          ...(system.trim() ? [{ role: "system", content: system }] : []),
          ...history.map(({ finish, name, ...m }) => (m.tool_calls ? { ...m, content: m.content || null } : m)),
        ],
        temperature: Number(temperature),
        max_tokens: Number(maxTokens),
        stream_options: { include_usage: true },
        ...(tools.length ? { tools } : {}),
      };
      for await (const chunk of streamChat(body, abort.current.signal)) {
        if (chunk.usage) setUsage(chunk.usage);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) reply += choice.delta.content;
        if (choice.delta && choice.delta.tool_calls) calls = addToolDeltas(calls, choice.delta.tool_calls);
        setStreaming({ content: reply, calls });
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    } catch (err) {
      if (err.name !== "AbortError") setError(err);
      finish = finish || "stopped";
    }
    setMessages([...history, { role: "assistant", content: reply, finish, ...(calls.length ? { tool_calls: calls } : {}) }]);
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
      <label class="field"><span class="label">Tools <span class="muted">JSON, optional</span></span>
        <textarea name="tools" rows="5" class="mono" value=${toolsText} onInput=${(e) => setToolsText(e.target.value)}
          placeholder='[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]'
          data-testid="pg-tools"></textarea>
      </label>
      <button class="btn" type="button" onClick=${() => { setMessages([]); setUsage(null); }}>Clear chat</button>
    </aside>
    <div class="card chat">
      <div class="chat-log" ref=${log} data-testid="chat-log">
        ${!messages.length && streaming === null && html`<p class="muted center">Send a message to chat with <span class="mono">${model || "a model"}</span>.</p>`}
        ${messages.map(
          (m, i) => html`<div key=${i} class=${`msg msg-${m.role}`} data-role=${m.role}>
            <div class="msg-role">${m.role === "tool" ? `tool result · ${m.name || m.tool_call_id}` : m.role}</div>
            ${m.content && html`<div class="msg-text">${m.content}</div>`}
            ${m.tool_calls && html`<${ToolCalls} calls=${m.tool_calls} />`}
            ${m.finish && !["stop", "tool_calls"].includes(m.finish) && html`<div class="muted small">finish: ${m.finish}</div>`}
          </div>`,
        )}
        ${streaming !== null && html`<div class="msg msg-assistant streaming" data-role="assistant-streaming">
          <div class="msg-role">assistant</div><div class="msg-text">${streaming.content}<span class="cursor">▍</span></div>
          ${streaming.calls.length > 0 && html`<${ToolCalls} calls=${streaming.calls} />`}</div>`}
      </div>
      <${ErrorBox} error=${error} />
      <form class="chat-input" onSubmit=${send}>
        <textarea rows="2" value=${input}
          placeholder=${pending.length ? `Result of ${pending[0].function.name} (${pending[0].id}), as the tool would return it` : "Type a message (Enter to send, Shift+Enter for a new line)"}
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
