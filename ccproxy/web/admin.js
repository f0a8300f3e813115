// The admin page: asks /admin/api/summary with the operator's key and draws what it answers.
// Every value from the server is written with textContent (names and labels are data, not HTML).
import { drawChart, formatNumber } from "/web/chart.js";

const TOKEN_KEY = "ccproxy.adminToken";
const RANGES = { "24h": [1, "hour"], "7d": [7, "day"], "30d": [30, "day"], "90d": [90, "day"] };
const $ = (id) => document.getElementById(id);

function rangeQuery(choice) {
  const [days, granularity] = RANGES[choice];
  const now = new Date();
  const from = new Date(now.getTime() - days * 86400e3);
  if (granularity === "day") from.setUTCHours(0, 0, 0, 0);
  const to = new Date(now.getTime() + 3600e3);
  const iso = (d) => d.toISOString().slice(0, 13) + ":00:00Z";
  return new URLSearchParams({ from: iso(from), to: iso(to), granularity });
}

function bucketLabel(start, granularity) {
  return granularity === "hour" ? start.slice(11, 16) : start.slice(5, 10);
}

function money(value) {
  return formatNumber(value, value < 1 ? 4 : 2);
}

function fillTable(table, columns, rows) {
  const head = document.createElement("tr");
  for (const [label] of columns) {
    const th = document.createElement("th");
    th.textContent = label;
    head.append(th);
  }
  const body = rows.map((row) => {
    const tr = document.createElement("tr");
    for (const [, value] of columns) {
      const td = document.createElement("td");
      const shown = value(row);
      if (shown instanceof Node) td.append(shown); else td.textContent = shown;
      tr.append(td);
    }
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = columns.length;
    td.className = "muted";
    td.textContent = "no usage in this range";
    tr.append(td);
    body.push(tr);
  }
  table.replaceChildren(head, ...body);
}

const SAVINGS = [
  ["requests", (r) => formatNumber(r.requests)],
  ["before", (r) => formatNumber(r.tokens_before)],
  ["after", (r) => formatNumber(r.tokens_after)],
  ["saved", (r) => `${formatNumber(r.tokens_saved)} (${formatNumber(r.savings_percent, 1)} %)`],
  ["money saved", (r) => money(r.money_saved)],
];

function render(report) {
  $("currency").textContent = report.currency;
  $("window").textContent = `${report.from} to ${report.to}`;
  $("truncated").classList.toggle("hidden", !report.truncated);
  for (const el of document.querySelectorAll("[data-total]")) {
    const name = el.dataset.total;
    const value = report.totals[name];
    el.textContent = name === "money_saved" ? money(value) : formatNumber(value, name === "savings_percent" ? 1 : 0);
    el.dataset.value = String(value);
  }
  const labels = report.series.map((b) => bucketLabel(b.start, report.granularity));
  const column = (key) => report.series.map((b) => b[key]);
  drawChart($("tokens-chart"), labels, [
    { key: "tokens_before", label: "before compression", values: column("tokens_before") },
    { key: "tokens_after", label: "sent upstream", values: column("tokens_after") },
    { key: "tokens_saved", label: "saved", values: column("tokens_saved") },
  ], "line", (v) => formatNumber(v));
  drawChart($("money-chart"), labels, [
    { key: "money_saved", label: `money saved (${report.currency})`, values: column("money_saved") },
  ], "bar", money);
  fillTable($("accounts"), [["account", (r) => r.name || r.account_id], ...SAVINGS], report.accounts);
  fillTable($("keys"), [
    ["key", (r) => (r.key_id || "(no key)") + (r.label ? ` · ${r.label}` : "")],
    ["account", (r) => r.account], ...SAVINGS,
  ], report.keys);
  fillTable($("models"), [["model", (r) => r.model || "(unrecorded)"], ...SAVINGS], report.models);
  const most = Math.max(1, ...report.outcomes.map((o) => o.requests));
  fillTable($("outcomes"), [
    ["outcome", (o) => o.outcome],
    ["requests", (o) => {
      const cell = document.createElement("span");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.round((120 * o.requests) / most)}px`;
      cell.append(bar, document.createTextNode(formatNumber(o.requests)));
      return cell;
    }],
  ], report.outcomes);
  document.body.dataset.loaded = "true";
}

async function load() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return showLogin("");
  $("error").textContent = "";
  $("refresh").disabled = true;
  try {
    const response = await fetch(`/admin/api/summary?${rangeQuery($("range").value)}`, {
      headers: { Authorization: `Bearer ${token}` }, cache: "no-store",
    });
    const body = await response.json().catch(() => ({}));
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      return showLogin("That key was refused.");
    }
    if (!response.ok) {
      $("error").textContent = (body.error && body.error.message) || `HTTP ${response.status}`;
      return;
    }
    $("login").classList.add("hidden");
    $("dashboard").classList.remove("hidden");
    render(body);
  } catch (error) {
    $("error").textContent = `The server could not be reached (${error.message}).`;
  } finally {
    $("refresh").disabled = false;
  }
}

function showLogin(message) {
  $("dashboard").classList.add("hidden");
  $("login").classList.remove("hidden");
  $("login-error").textContent = message;
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  load();
});
$("range").addEventListener("change", load);
$("refresh").addEventListener("click", load);
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin("");
});
load();
