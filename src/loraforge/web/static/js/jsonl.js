// Client-side checks of a JSONL training file before it is uploaded: the same rules the server
// applies (one JSON object per line, a non-empty `messages` list, an assistant message to train
// on, at least 10 examples; for DPO, OpenAI's preference lines: `input.messages` and one
// assistant message in each of `preferred_output` and `non_preferred_output`), reported by line
// so the user can fix the file first.

export const MIN_EXAMPLES = 10;
const ROLES = new Set(["system", "developer", "user", "assistant", "tool", "function"]);
const MAX_PROBLEMS = 20;
// Reading a multi-GB file into the tab would hang it; beyond this only the head is checked.
const MAX_CHECK_BYTES = 64 * 1024 * 1024;

function checkLine(obj) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) return "is not a JSON object";
  if (!Array.isArray(obj.messages)) return "has no \"messages\" list";
  if (!obj.messages.length) return "has an empty \"messages\" list";
  for (const [i, m] of obj.messages.entries()) {
    if (m === null || typeof m !== "object") return `message ${i + 1} is not an object`;
    if (!ROLES.has(m.role)) return `message ${i + 1} has an unrecognized role ${JSON.stringify(m.role)}`;
    const hasContent = typeof m.content === "string" || Array.isArray(m.content);
    if (!hasContent && !(m.role === "assistant" && (m.tool_calls || m.function_call))) {
      return `message ${i + 1} (${m.role}) has no content`;
    }
  }
  if (!obj.messages.some((m) => m.role === "assistant")) return "has no assistant message to train on";
  return null;
}

function checkOutput(obj, key) {
  const out = obj[key];
  if (!Array.isArray(out) || out.length !== 1) return `needs "${key}": a list with one assistant message`;
  const m = out[0];
  if (m === null || typeof m !== "object" || m.role !== "assistant") return `"${key}" must hold an assistant message`;
  if (!(typeof m.content === "string" || Array.isArray(m.content))) return `"${key}" has no content`;
  return null;
}

function checkPreferenceLine(obj) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) return "is not a JSON object";
  if (Array.isArray(obj.messages)) return "is a chat example; a DPO job needs preference examples (input, preferred_output, non_preferred_output)";
  if (obj.input === null || typeof obj.input !== "object") return "has no \"input\" object";
  if (!Array.isArray(obj.input.messages) || !obj.input.messages.length) return "has no \"input.messages\" list";
  // The prompt's messages follow the chat rules (the completion stands in for the assistant turn).
  const problem = checkLine({ messages: [...obj.input.messages, { role: "assistant", content: "" }] });
  if (problem) return `input: ${problem}`;
  return checkOutput(obj, "preferred_output") || checkOutput(obj, "non_preferred_output");
}

/**
 * Check a File (`method` "dpo": preference lines). Resolves to {examples, problems: [{line, message}], truncated, partial}; an empty
 * `problems` list means the file looks trainable.
 */
export async function checkTrainingFile(file, method = "supervised") {
  const check = method === "dpo" ? checkPreferenceLine : checkLine;
  const problems = [];
  if (!/\.jsonl$/i.test(file.name)) {
    problems.push({ line: null, message: `"${file.name}" is not a .jsonl file` });
  }
  const partial = file.size > MAX_CHECK_BYTES;
  const text = await file.slice(0, MAX_CHECK_BYTES).text();
  const lines = text.split("\n");
  if (partial) lines.pop(); // the last line may be cut in half
  let examples = 0;
  for (const [i, raw] of lines.entries()) {
    if (!raw.trim()) continue;
    let obj;
    try {
      obj = JSON.parse(raw);
    } catch {
      problems.push({ line: i + 1, message: "is not valid JSON" });
      continue;
    }
    const problem = check(obj);
    if (problem) problems.push({ line: i + 1, message: problem });
    else examples++;
  }
  if (!partial && !problems.length && examples < MIN_EXAMPLES) {
    problems.push({
      line: null,
      message: `has ${examples} example(s), but at least ${MIN_EXAMPLES} are needed`,
    });
  }
  return { examples, problems: problems.slice(0, MAX_PROBLEMS), truncated: problems.length > MAX_PROBLEMS, partial };
}
