// The /v1 client of the web platform: the same OpenAI-shaped endpoints the SDK calls, with the
// API key the user signed in with (kept in sessionStorage, so it dies with the browser tab).

const KEY_ITEM = "loraforge.apiKey";
// Files above this size go through the chunked /v1/uploads API when the server has it.
const CHUNKED_ABOVE = 16 * 1024 * 1024;
const PART_BYTES = 8 * 1024 * 1024;

export const auth = {
  get: () => sessionStorage.getItem(KEY_ITEM),
  set: (key) => sessionStorage.setItem(KEY_ITEM, key),
  clear: () => sessionStorage.removeItem(KEY_ITEM),
};

/** An error from the API, carrying OpenAI's envelope fields. */
export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || (typeof body === "string" && body) || `HTTP ${status}`);
    this.status = status;
    this.type = err.type || null;
    this.code = err.code || null;
    this.param = err.param || null;
  }
  /** True when the endpoint itself is missing (a feature this server does not have yet). */
  get missing() {
    return this.status === 405 || (this.status === 404 && /Unknown request URL/i.test(this.message));
  }
}

async function toError(res) {
  const text = await res.text();
  let body = text;
  try {
    body = JSON.parse(text);
  } catch {
    /* not JSON: keep the text */
  }
  if (res.status === 401) window.dispatchEvent(new Event("loraforge:unauthorized"));
  return new ApiError(res.status, body);
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${auth.get() || ""}`, ...extra };
}

function query(params) {
  if (!params) return "";
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) qs.set(k, v);
  const s = qs.toString();
  return s ? `?${s}` : "";
}

/** A model id as a path: ids contain "/" and ":", matched by the API's {model:path} routes. */
export function modelPath(id) {
  return id.split("/").map(encodeURIComponent).join("/");
}

/** Call /v1{path}; JSON in and out, errors raised as ApiError. */
export async function api(path, { method = "GET", body, params, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(`/v1${path}${query(params)}`, init);
  if (!res.ok) throw await toError(res);
  return res.json();
}

/** Every item of a cursor-paginated list (bounded by maxPages). */
export async function listAll(path, params = {}, maxPages = 20) {
  const items = [];
  let after;
  for (let page = 0; page < maxPages; page++) {
    const res = await api(path, { params: { ...params, after } });
    items.push(...res.data);
    if (!res.has_more || !res.data.length) break;
    after = res.data[res.data.length - 1].id;
  }
  return items;
}

function xhrPost(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1${path}`);
    xhr.setRequestHeader("Authorization", `Bearer ${auth.get() || ""}`);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded, e.total);
    xhr.onerror = () => reject(new ApiError(0, "Network error during upload"));
    xhr.onload = () => {
      let body = xhr.responseText;
      try {
        body = JSON.parse(body);
      } catch {
        /* keep text */
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        if (xhr.status === 401) window.dispatchEvent(new Event("loraforge:unauthorized"));
        reject(new ApiError(xhr.status, body));
      }
    };
    xhr.send(form);
  });
}

/** One multipart POST /v1/files, reporting bytes sent. */
export function uploadSingle(file, purpose, onProgress = () => {}) {
  const form = new FormData();
  form.append("purpose", purpose);
  form.append("file", file, file.name);
  return xhrPost("/files", form, (loaded, total) => onProgress(Math.min(loaded, file.size), file.size, total));
}

/** The chunked upload of OpenAI's /v1/uploads: create, parts in order, complete. */
export async function uploadChunked(file, purpose, onProgress = () => {}, partBytes = PART_BYTES) {
  const upload = await api("/uploads", {
    method: "POST",
    body: { bytes: file.size, filename: file.name, mime_type: file.type || "application/jsonl", purpose },
  });
  const partIds = [];
  for (let offset = 0; offset < file.size || (file.size === 0 && !partIds.length); offset += partBytes) {
    const form = new FormData();
    form.append("data", file.slice(offset, offset + partBytes), "upload");
    const part = await xhrPost(`/uploads/${upload.id}/parts`, form, (loaded) =>
      onProgress(Math.min(offset + loaded, file.size), file.size),
    );
    partIds.push(part.id);
    if (file.size === 0) break;
  }
  const done = await api(`/uploads/${upload.id}/complete`, { method: "POST", body: { part_ids: partIds } });
  onProgress(file.size, file.size);
  return done.file;
}

/**
 * Upload a file with progress: chunked through /v1/uploads for large files when the server has
 * that API, one multipart request otherwise. Resolves to {file, chunked}.
 */
export async function uploadFile(file, purpose, onProgress = () => {}) {
  // Tests (and curious users) can lower the threshold for this browser session.
  const threshold = Number(sessionStorage.getItem("loraforge.chunkedAbove")) || CHUNKED_ABOVE;
  const partBytes = Number(sessionStorage.getItem("loraforge.partBytes")) || PART_BYTES;
  if (file.size > threshold) {
    try {
      return { file: await uploadChunked(file, purpose, onProgress, partBytes), chunked: true };
    } catch (e) {
      if (!(e instanceof ApiError && e.missing)) throw e;
    }
  }
  return { file: await uploadSingle(file, purpose, onProgress), chunked: false };
}

/** Stream a chat completion (SSE); yields each chunk object, stops at [DONE]. */
export async function* streamChat(body, signal) {
  const res = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!res.ok) throw await toError(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event
        .split("\n")
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart())
        .join("\n");
      if (!data) continue; // keep-alive comments
      if (data.startsWith("[DONE]")) return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(200, chunk);
      yield chunk;
    }
  }
}

function filenameFrom(res, fallback) {
  const cd = res.headers.get("content-disposition") || "";
  const m = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(cd);
  return m ? decodeURIComponent(m[1]) : fallback;
}

/**
 * Download an authenticated /v1 resource as a file (the key travels in a header, so a plain link
 * cannot do it). Reports bytes received; resolves to {name, bytes}.
 */
export async function download(path, fallbackName, { params, onProgress = () => {}, transform } = {}) {
  const res = await fetch(`/v1${path}${query(params)}`, { headers: headers({ Accept: "application/binary" }) });
  if (!res.ok) throw await toError(res);
  const total = Number(res.headers.get("content-length")) || 0;
  const reader = res.body.getReader();
  const parts = [];
  let received = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parts.push(value);
    received += value.length;
    onProgress(received, total);
  }
  const name = filenameFrom(res, fallbackName);
  let blob = new Blob(parts, { type: res.headers.get("content-type") || "" });
  if (transform) blob = await transform(blob);
  const url = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30000);
  return { name, bytes: received };
}

/**
 * Result files hold the CSV base64-encoded, as OpenAI's do; users want the CSV itself. Returns
 * the decoded CSV when the blob is base64 of text, the blob unchanged otherwise.
 */
export async function decodeBase64Csv(blob) {
  const text = (await blob.text()).trim();
  if (!/^[A-Za-z0-9+/=\s]+$/.test(text)) return blob;
  try {
    const bytes = Uint8Array.from(atob(text.replace(/\s+/g, "")), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type: "text/csv" });
  } catch {
    return blob;
  }
}
