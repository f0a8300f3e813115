// The demo page: sends the chat to /demo/api/compress and shows each unit kept, kept in part or
// dropped, then plays the saving: dropped units fade out one by one while the counter runs
// down from the tokens before to the tokens sent. Text is written with textContent only.
import { formatNumber } from "/web/chart.js";

const $ = (id) => document.getElementById(id);
let samples = [];

function chatFromInput(text) {
  const trimmed = text.trim();
  if (trimmed.startsWith("[")) {
    try {
      const parsed = JSON.parse(trimmed);
      if (Array.isArray(parsed)) return parsed.map((m) => ({ role: m.role, content: String(m.content ?? "") }));
    } catch (error) { /* not JSON: plain text below */ }
  }
  return [{ role: "user", content: text }];
}

function showSample(index) {
  const sample = samples[index];
  if (sample) $("chat").value = JSON.stringify(sample.messages, null, 1);
}

function renderTranscript(answer) {
  const dropped = [];
  const messages = answer.messages.map((message) => {
    const box = document.createElement("div");
    box.className = "message";
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = message.role;
    const body = document.createElement("div");
    for (const unit of message.units) {
      const span = document.createElement("span");
      span.className = "unit";
      span.textContent = unit.text;
      span.dataset.tokens = String(unit.tokens ?? "");
      if (unit.protected) span.classList.add("protected");
      else if (!unit.kept) { span.classList.add("dropped"); dropped.push([span, unit.tokens - unit.kept_tokens]); }
      else if (unit.partly) { span.classList.add("partly"); dropped.push([span, unit.tokens - unit.kept_tokens]); }
      else span.classList.add("kept");
      body.append(span, document.createTextNode(" "));
    }
    box.append(role, body);
    return box;
  });
  $("transcript").replaceChildren(...messages);
  return dropped;
}

function setCounter(current, answer) {
  const before = answer.tokens_before || 1;
  $("after").textContent = formatNumber(current);
  $("saved").textContent = `${formatNumber((100 * (answer.tokens_before - current)) / before, 1)} %`;
  $("fill").style.width = `${(100 * current) / before}%`;
}

// Plays the saving over about two seconds; resolves when the page shows the final figures.
function animate(answer, dropped) {
  $("before").textContent = formatNumber(answer.tokens_before);
  setCounter(answer.tokens_before, answer);
  document.body.dataset.state = "animating";
  const steps = Math.max(dropped.length, 1);
  const stepMs = Math.min(180, 2200 / steps);
  let current = answer.tokens_before;
  return new Promise((resolve) => {
    let i = 0;
    const tick = () => {
      if (i < dropped.length) {
        const [span, tokens] = dropped[i++];
        if (span.classList.contains("dropped")) span.classList.add("gone");
        current -= tokens;
        setCounter(Math.max(current, answer.tokens_after), answer);
        setTimeout(tick, stepMs);
      } else {
        setCounter(answer.tokens_after, answer);
        document.body.dataset.state = "done";
        resolve();
      }
    };
    setTimeout(tick, 400);
  });
}

async function run() {
  $("error").textContent = "";
  $("run").disabled = true;
  $("status").textContent = "scoring…";
  document.body.dataset.state = "scoring";
  try {
    const response = await fetch("/demo/api/compress", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: chatFromInput($("chat").value), ratio: Number($("ratio").value) }),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      $("error").textContent = (answer.error && answer.error.message) || `HTTP ${response.status}`;
      document.body.dataset.state = "error";
      return;
    }
    $("result").classList.remove("hidden");
    $("outcome").textContent = answer.outcome === "compressed" ? "" : `not compressed: ${answer.outcome.replaceAll("_", " ")}`;
    await animate(answer, renderTranscript(answer));
  } catch (error) {
    $("error").textContent = `The server could not be reached (${error.message}).`;
    document.body.dataset.state = "error";
  } finally {
    $("run").disabled = false;
    $("status").textContent = "";
  }
}

async function loadSamples() {
  const response = await fetch("/demo/api/samples");
  const body = await response.json();
  samples = body.samples;
  $("sample").replaceChildren(...samples.map((sample, i) => {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = sample.title;
    return option;
  }));
  $("source").textContent = `Samples: ${body.source}`;
  showSample(0);
}

$("sample").addEventListener("change", (event) => showSample(Number(event.target.value)));
$("ratio").addEventListener("input", () => { $("ratio-value").textContent = `${Math.round(100 * $("ratio").value)} %`; });
$("run").addEventListener("click", run);
loadSamples().catch((error) => { $("error").textContent = `Samples could not be loaded (${error.message}).`; });
