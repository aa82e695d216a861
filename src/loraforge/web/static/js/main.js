// The platform shell: sign-in, navigation and a hash router (#/jobs, #/jobs/new, #/jobs/ID,
// #/files, #/models, #/playground?model=...). Hash routes keep the server to one page.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { api, ApiError, auth } from "./api.js";
import { html, ErrorBox } from "./ui.js";
import { JobsPage } from "./pages/jobs.js";
import { CreateJobPage } from "./pages/create.js";
import { JobDetailPage } from "./pages/job.js";
import { FilesPage } from "./pages/files.js";
import { ModelsPage } from "./pages/models.js";
import { PlaygroundPage } from "./pages/playground.js";

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/jobs";
  const [path, qs] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(qs || "") };
}

function useRoute() {
  const [route, setRoute] = useState(parseHash());
  useEffect(() => {
    const on = () => setRoute(parseHash());
    window.addEventListener("hashchange", on);
    return () => window.removeEventListener("hashchange", on);
  }, []);
  return route;
}

function SignIn({ onSignedIn }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    auth.set(key.trim());
    try {
      await api("/models"); // any authenticated call proves the key
      onSignedIn();
    } catch (err) {
      auth.clear();
      setError(err instanceof ApiError ? err : new Error(String(err)));
    } finally {
      setBusy(false);
    }
  };
  return html`<div class="signin">
    <form class="card signin-card" onSubmit=${submit}>
      <div class="brand big">lora<span>forge</span></div>
      <p class="muted">Fine-tune, evaluate and chat with LoRA adapters. Sign in with an API key.</p>
      <label>API key
        <input type="password" name="api_key" autocomplete="off" placeholder="sk-lf-…" value=${key}
          onInput=${(e) => setKey(e.target.value)} required />
      </label>
      <${ErrorBox} error=${error} title="Sign-in failed" />
      <button class="btn primary" type="submit" disabled=${busy || !key.trim()}>${busy ? "Checking…" : "Sign in"}</button>
      <p class="muted small">
        The key stays in this browser tab only (sessionStorage).${" "}
        Create one with <code>loraforge keys create --org NAME</code>.
      </p>
    </form>
  </div>`;
}

const NAV = [
  ["jobs", "Fine-tuning"],
  ["files", "Files"],
  ["models", "Models"],
  ["playground", "Playground"],
];

function Shell({ route, onSignOut }) {
  const [section, id] = route.parts;
  let page;
  if (section === "jobs" && id === "new") page = html`<${CreateJobPage} />`;
  else if (section === "jobs" && id) page = html`<${JobDetailPage} id=${id} key=${id} />`;
  else if (section === "files") page = html`<${FilesPage} />`;
  else if (section === "models") page = html`<${ModelsPage} />`;
  else if (section === "playground") page = html`<${PlaygroundPage} initialModel=${route.params.get("model")} />`;
  else page = html`<${JobsPage} />`;
  const key = auth.get() || "";
  return html`<div class="shell">
    <header class="topbar">
      <a class="brand" href="#/jobs">lora<span>forge</span></a>
      <nav>
        ${NAV.map(
          ([s, label]) =>
            html`<a href=${`#/${s}`} class=${(section || "jobs") === s ? "active" : ""} data-nav=${s}>${label}</a>`,
        )}
      </nav>
      <div class="topbar-right">
        <span class="muted small" title="signed-in key">${key.slice(0, 8)}…${key.slice(-4)}</span>
        <button class="btn small" onClick=${onSignOut}>Sign out</button>
      </div>
    </header>
    <main class="content">${page}</main>
  </div>`;
}

function App() {
  const [signedIn, setSignedIn] = useState(Boolean(auth.get()));
  const route = useRoute();
  useEffect(() => {
    const out = () => {
      auth.clear();
      setSignedIn(false);
    };
    window.addEventListener("loraforge:unauthorized", out);
    return () => window.removeEventListener("loraforge:unauthorized", out);
  }, []);
  if (!signedIn) return html`<${SignIn} onSignedIn=${() => setSignedIn(true)} />`;
  return html`<${Shell}
    route=${route}
    onSignOut=${() => {
      auth.clear();
      setSignedIn(false);
    }}
  />`;
}

const root = document.getElementById("app");
root.textContent = ""; // drop the "Loading" placeholder: render() appends to what is there
render(html`<${App} />`, root);
