// The eventpipe console: polls GET /v1/admin/overview, draws it, follows /v1/stream, and
// calls the admin and subscription APIs. Authenticated by the HttpOnly session cookie that
// POST /v1/login sets for the admin token; the token itself is never stored.

const POLL_MS = 2000;
const CREDENTIALS_EVERY_MS = 10000;
const TAIL_ROWS = 200;
const TOPIC_ROWS = 200;
// Charts span the history there is, from one minute up to the ten the gateway keeps.
const CHART_MIN_MS = 60 * 1000;
const CHART_MAX_MS = 10 * 60 * 1000;
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

/** An element with attributes (`class`, `data-*`, ...) and children (text or nodes). */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== undefined && c !== null));
  return node;
}

function svg(tag, attributes = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

/** A number for a person: 0.4, 12, 1,204, 3.1M. */
function number(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const abs = Math.abs(value);
  if (abs >= 1e6) return `${(value / 1e6).toFixed(1)}M`;
  if (abs >= 100) return Math.round(value).toLocaleString("en");
  if (abs >= 10 || Number.isInteger(value)) return value.toFixed(0);
  return value.toFixed(1);
}

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 0) return "for ever";
  const s = ms / 1000;
  if (s < 90) return `${Math.round(s)}s`;
  if (s < 5400) return `${Math.round(s / 60)}m`;
  if (s < 129600) return `${(s / 3600).toFixed(1)}h`;
  return `${(s / 86400).toFixed(1)}d`;
}

function list(text) {
  return text.split(",").map((s) => s.trim()).filter(Boolean);
}

/** A call to the gateway: the answer's JSON, or an Error carrying the status and reason. */
async function api(method, path, body, headers = {}) {
  const init = { method, headers: { ...headers }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { message: text };
    }
  }
  if (!response.ok) {
    const error = new Error(data?.message ?? `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.code = data?.error;
    throw error;
  }
  return data;
}

// --- the page's state -----------------------------------------------------------------------

let polling = null;
let lastCredentials = 0;
let lastOverview = null;

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

function showProblem(text) {
  const problem = $("problem");
  problem.textContent = text ?? "";
  problem.hidden = !text;
}

function showLogin(reason) {
  stopPolling();
  stopTail();
  $("console").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = reason ?? "";
  setStatus("logged-out", "not logged in");
  $("token").focus();
}

function showConsole() {
  $("login").hidden = true;
  $("console").hidden = false;
  $("logout").hidden = false;
}

/** A failed call: back to the login on 401/403, else the problem line. */
function failed(error, doing) {
  if (error.status === 401 || error.status === 403) {
    showLogin(error.status === 403 ? `this session may not administer: ${error.message}` : "");
    return;
  }
  showProblem(`${doing}: ${error.message}`);
}

function stopPolling() {
  clearTimeout(polling);
  polling = null;
}

async function poll() {
  stopPolling();
  try {
    const overview = await api("GET", "/v1/admin/overview");
    showConsole();
    lastOverview = overview;
    drawOverview(overview);
    await loadPauses();
    setStatus("live", `live · ${new Date(overview.generated_at).toLocaleTimeString("en-GB")}`);
    if (Date.now() - lastCredentials > CREDENTIALS_EVERY_MS) await loadCredentials();
    if ($("problem").dataset.from === "poll") showProblem("");
  } catch (error) {
    if (error.status === 401 || error.status === 403) return failed(error, "overview");
    setStatus("stale", "gateway not answering; retrying");
    $("problem").dataset.from = "poll";
    showProblem(`reading the overview: ${error.message}`);
  }
  polling = setTimeout(poll, POLL_MS);
}

// --- stages ---------------------------------------------------------------------------------

function drawStages(stages) {
  const cards = stages.map((stage) => {
    const deadLetters = Object.entries(stage.dead_letters);
    const card = el(
      "article",
      {
        class: `card ${stage.up ? "up" : "down"}`,
        "data-stage": stage.name,
        "data-up": String(stage.up),
        "data-in-per-sec": stage.in_per_sec,
        "data-out-per-sec": stage.out_per_sec,
        "data-in-total": stage.in_total,
        "data-out-total": stage.out_total,
      },
      el(
        "header",
        {},
        el("h3", {}, stage.name),
        el("span", { class: "kind" }, stage.kind && stage.kind !== stage.name ? stage.kind : ""),
        el("span", { class: `badge ${stage.up ? "ok" : "bad"}` }, stage.up ? "up" : "down"),
      ),
      el(
        "dl",
        { class: "figures" },
        el("div", {}, el("dt", {}, "in/s"), el("dd", { class: "in-rate" }, number(stage.in_per_sec))),
        el("div", {}, el("dt", {}, "out/s"), el("dd", { class: "out-rate" }, number(stage.out_per_sec))),
        el(
          "div",
          { title: stage.kind === "gateway" ? "the largest lag of a durable subscription" : "consumer lag, records" },
          el("dt", {}, stage.kind === "gateway" ? "sub. lag" : "lag"),
          el("dd", { class: "lag" }, number(stage.lag)),
        ),
        el(
          "div",
          {},
          el("dt", {}, "dead/s"),
          el("dd", { class: stage.dead_letters_per_sec > 0 ? "dead bad" : "dead" }, number(stage.dead_letters_per_sec)),
        ),
      ),
      chart(stage.history),
      el(
        "p",
        { class: "legend" },
        el("span", { class: "in" }, "in"),
        el("span", { class: "out" }, "out"),
        el("span", { class: "dead" }, "dead letters"),
      ),
      el(
        "p",
        { class: "totals muted" },
        `in ${number(stage.in_total)} · out ${number(stage.out_total)}`,
      ),
      deadLetters.length
        ? el(
            "ul",
            { class: "dead-letters" },
            deadLetters.map(([kind, count]) =>
              el("li", { "data-kind": kind, "data-count": count }, `${kind} ${number(count)}`),
            ),
          )
        : null,
      stage.up ? null : el("p", { class: "error" }, stage.error ?? "down"),
      el("p", { class: "source muted" }, stage.source),
    );
    return card;
  });
  $("stages").replaceChildren(...cards);
  const up = stages.filter((s) => s.up).length;
  $("stages-note").textContent = `${up} of ${stages.length} answering`;
}

/** The rates of the last ten minutes: in and out as lines, dead letters as a red line. */
function chart(history) {
  const width = 260;
  const height = 64;
  const box = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img" });
  const now = Date.now();
  const oldest = history.length ? history[0].at : now;
  const span = Math.min(CHART_MAX_MS, Math.max(CHART_MIN_MS, now - oldest));
  const from = now - span;
  const points = history.filter((p) => p.at >= from);
  const top = Math.max(1, ...points.map((p) => Math.max(p.in, p.out, p.dead_letters)));
  const x = (at) => ((at - from) / span) * width;
  const y = (value) => height - 2 - (value / top) * (height - 14);
  box.append(svg("line", { class: "axis", x1: 0, x2: width, y1: height - 2, y2: height - 2 }));
  for (const [key, cls] of [["in", "series-in"], ["out", "series-out"], ["dead_letters", "series-dead"]]) {
    if (key === "dead_letters" && !points.some((p) => p.dead_letters > 0)) continue;
    if (points.length < 2) continue;
    const line = points.map((p) => `${x(p.at).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");
    box.append(svg("polyline", { class: cls, points: line }));
  }
  const label = svg("text", { x: 2, y: 9, class: "chart-label" });
  label.textContent = `max ${number(top)}/s · last ${duration(span)}`;
  box.append(label);
  const title = svg("title");
  title.textContent = "events per second: in (blue), out (green), dead letters (red)";
  box.append(title);
  return box;
}

// --- subscriptions, connections, topics -----------------------------------------------------

function meter(value, max, text) {
  const ratio = max > 0 ? Math.min(1, value / max) : 0;
  return el(
    "span",
    { class: "meter-cell" },
    el("meter", { min: 0, max: 1, low: 0.5, high: 0.8, optimum: 0, value: ratio.toFixed(3) }),
    el("span", { class: "muted" }, text),
  );
}

/** When each armed button (by what it acts on) stops waiting for its second click; kept
 * here because the tables are redrawn under it every poll. */
const armedUntil = new Map();
const ARMED_MS = 4000;

/** A button that acts on a second click within four seconds (no blocking confirm dialog). */
function armedButton(key, label, action) {
  const button = el("button", { type: "button", class: "danger" }, label);
  const show = () => {
    const left = (armedUntil.get(key) ?? 0) - Date.now();
    button.textContent = left > 0 ? "sure?" : label;
    if (left > 0) setTimeout(show, left);
  };
  show();
  button.addEventListener("click", async () => {
    if (!((armedUntil.get(key) ?? 0) > Date.now())) {
      armedUntil.set(key, Date.now() + ARMED_MS);
      show();
      return;
    }
    armedUntil.delete(key);
    button.disabled = true;
    await action();
  });
  return button;
}

function drawSubscriptions(overview) {
  const rows = overview.subscriptions.map((s) =>
    el(
      "tr",
      { "data-name": s.name, "data-state": s.state },
      el("td", {}, s.name),
      el("td", {}, s.owner),
      el("td", { class: "mono" }, s.filters.join(", ")),
      el("td", {}, s.topics.length ? s.topics.join(", ") : "all"),
      el("td", {}, el("span", { class: `badge ${s.state === "active" ? "ok" : "idle"}` }, s.state)),
      el("td", { class: "number" }, number(s.lag)),
      el("td", {}, s.queue ? meter(s.queue.queued, s.queue.capacity, `${s.queue.queued}/${s.queue.capacity}`) : el("span", { class: "muted" }, "–")),
      el(
        "td",
        {},
        armedButton(`subscription:${s.name}`, "delete", () =>
          act(`deleting subscription ${s.name}`, () => api("DELETE", `/v1/subscriptions/${encodeURIComponent(s.name)}`)),
        ),
      ),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no durable subscriptions")));
  $("subscriptions").tBodies[0].replaceChildren(...rows);
  $("subscriptions-note").textContent = overview.subscriptions_error ?? `${overview.subscriptions.length}`;
}

function drawQueues(overview) {
  const dropped = Object.entries(overview.dropped)
    .map(([reason, count]) => `${reason} ${number(count)}`)
    .join(", ");
  const count = $("connections-count");
  count.textContent = `${overview.connections} live · dropped since start: ${dropped || "none"}`;
  count.dataset.gone = overview.dropped.gone ?? 0;
  const rows = overview.queues.map((q) =>
    el(
      "tr",
      {},
      el("td", { class: "mono" }, q.filters),
      el("td", {}, q.topics.length ? q.topics.join(", ") : "all"),
      el("td", {}, meter(q.queued, q.capacity, `${q.queued}/${q.capacity}`)),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 3, class: "muted" }, "no live connections")));
  $("queues").tBodies[0].replaceChildren(...rows);
}

/** retention.ms, and retention.bytes when a topic has a size bound too. */
function retention(topic) {
  const time = topic.retention_ms === null ? "–" : duration(topic.retention_ms);
  const bytes = topic.retention_bytes;
  if (!(bytes > 0)) return time;
  const size = bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  return `${time} or ${size} a partition`;
}

function drawTopics(view) {
  const wanted = $("topic-filter").value.trim();
  const served = new Set(lastOverview?.served_topics ?? []);
  const all = view.topics;
  const shown = all.filter((t) => !wanted || t.name.includes(wanted));
  const rows = shown.slice(0, TOPIC_ROWS).map((t) => {
    const partitions = t.partitions.map((p) => `${p.partition}: ${p.low}–${p.high}`).join("\n");
    const fill = t.retention_fill;
    return el(
      "tr",
      { "data-topic": t.name },
      el("td", {}, t.name, served.has(t.name) ? el("span", { class: "badge ok small" }, "served") : null),
      el("td", { class: "number", title: partitions }, t.partitions.length),
      el("td", { class: "number" }, number(t.records)),
      el("td", {}, fill === null ? el("span", { class: "muted" }, t.records ? "–" : "empty") : meter(fill, 1, `${Math.round(fill * 100)}%`)),
      el("td", {}, t.oldest_age_ms === null ? "–" : `${duration(t.oldest_age_ms)} ago`),
      el("td", {}, retention(t)),
    );
  });
  if (!rows.length) {
    const why = view.scanned_at ? "no topic matches" : "scanning…";
    rows.push(el("tr", {}, el("td", { colspan: 6, class: "muted" }, why)));
  }
  $("topics").tBodies[0].replaceChildren(...rows);
  let note = `${shown.length} of ${all.length}`;
  if (shown.length > TOPIC_ROWS) note += `, first ${TOPIC_ROWS} shown`;
  if (view.truncated) note += ", cluster has more partitions than a scan reads";
  if (view.error) note += ` · last scan failed: ${view.error}`;
  $("topics-note").textContent = note;
}

/** Pauses still in force or releasing, and the ones resumed since (`?all=true`). */
async function loadPauses() {
  let answer;
  try {
    answer = await api("GET", "/v1/admin/flows?all=true");
  } catch (error) {
    $("flows-note").textContent = `flow control unavailable: ${error.message}`;
    return;
  }
  const since = (time) => (time ? duration(Date.now() - new Date(time).getTime()) + " ago" : "–");
  const rows = answer.pauses.map((p) =>
    el(
      "tr",
      { "data-pause": p.id, "data-status": p.status, "data-held": String(p.held ?? 0) },
      el("td", { class: "mono" }, p.id),
      el("td", { class: "mono" }, p.filters.join(", ")),
      el("td", {}, p.scope),
      el("td", {}, el("span", { class: `badge ${p.status === "resumed" ? "idle" : "warn"}` }, p.status)),
      el("td", { class: "number" }, number(p.held ?? 0)),
      el("td", {}, since(p.oldest_held_at)),
      el("td", {}, p.reason),
      el("td", { class: "muted" }, since(p.paused_at)),
      el(
        "td",
        {},
        p.status === "paused"
          ? armedButton(`pause:${p.id}`, "resume", () =>
              act(`resuming ${p.id}`, () => api("POST", `/v1/admin/flows/${encodeURIComponent(p.id)}/resume`)),
            )
          : null,
      ),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "nothing paused")));
  $("pauses").tBodies[0].replaceChildren(...rows);
  const active = answer.pauses.filter((p) => p.status !== "resumed").length;
  $("flows-note").textContent = `${active} in force`;
}

function drawOverview(overview) {
  drawStages(overview.stages);
  drawSubscriptions(overview);
  drawQueues(overview);
  drawTopics(overview.topics);
}

// --- users and keys -------------------------------------------------------------------------

async function loadCredentials() {
  lastCredentials = Date.now();
  const [users, keys] = await Promise.all([api("GET", "/v1/admin/users"), api("GET", "/v1/admin/keys")]);
  const userRows = users.users.map((u) =>
    el(
      "tr",
      { "data-user": u.name },
      el("td", {}, u.name),
      el("td", { class: "mono" }, u.filters.join(", ")),
      el("td", {}, u.topics.length ? u.topics.join(", ") : "any"),
      el("td", { class: "muted" }, new Date(u.created_at).toLocaleString("en-GB")),
      el(
        "td",
        {},
        armedButton(`user:${u.name}`, "remove", () => act(`removing user ${u.name}`, () => api("DELETE", `/v1/admin/users/${encodeURIComponent(u.name)}`))),
      ),
    ),
  );
  if (!userRows.length) userRows.push(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "no users")));
  $("users").tBodies[0].replaceChildren(...userRows);
  const keyRows = keys.keys.map((k) =>
    el(
      "tr",
      { "data-key": k.id, "data-status": k.status },
      el("td", { class: "mono" }, k.id),
      el("td", {}, k.kind),
      el("td", {}, k.service ?? k.user ?? ""),
      el("td", {}, el("span", { class: `badge ${k.status === "active" ? "ok" : "idle"}` }, k.status)),
      el("td", {}, k.topics.length ? k.topics.join(", ") : "any"),
      el("td", { class: "muted" }, k.expires_at ? new Date(k.expires_at).toLocaleString("en-GB") : "never"),
      el("td", {}, k.description),
      el(
        "td",
        {},
        k.status === "active"
          ? armedButton(`key:${k.id}`, "revoke", () => act(`revoking key ${k.id}`, () => api("DELETE", `/v1/admin/keys/${encodeURIComponent(k.id)}`)))
          : null,
      ),
    ),
  );
  if (!keyRows.length) keyRows.push(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no keys")));
  $("keys").tBodies[0].replaceChildren(...keyRows);
}

/** Runs a change, shows its failure, then redraws what it may have changed. */
async function act(doing, change) {
  try {
    const answer = await change();
    showProblem("");
    await loadCredentials();
    await poll();
    return answer;
  } catch (error) {
    failed(error, doing);
    return null;
  }
}

function showSecret(what, value) {
  $("secret-what").textContent = what;
  $("secret-value").textContent = value;
  $("secret").hidden = false;
}

function formFields(form) {
  return Object.fromEntries(new FormData(form).entries());
}

function wireForms() {
  $("subscription-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const fields = formFields(form);
    const body = { filters: list(fields.filters), topics: list(fields.topics), start: fields.start };
    const done = await act(`creating subscription ${fields.name}`, () =>
      api("PUT", `/v1/subscriptions/${encodeURIComponent(fields.name.trim())}`, body),
    );
    if (done) form.reset();
  });
  $("pause-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const fields = formFields(form);
    const body = { filters: list(fields.filters), scope: fields.scope, reason: fields.reason };
    const paused = await act("pausing", () => api("POST", "/v1/admin/flows", body));
    if (paused) form.reset();
  });
  $("user-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const fields = formFields(form);
    const body = { name: fields.name.trim(), filters: list(fields.filters), topics: list(fields.topics) };
    if (fields.password) body.password = fields.password;
    const added = await act(`adding user ${body.name}`, () => api("POST", "/v1/admin/users", body));
    if (added) {
      form.reset();
      if (added.password) showSecret(`The generated password of ${added.name}:`, added.password);
    }
  });
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const fields = formFields(form);
    const body = { kind: fields.kind, topics: list(fields.topics), description: fields.description };
    body[fields.kind === "producer" ? "service" : "user"] = fields.owner.trim();
    if (fields.expires.trim()) body.expires = fields.expires.trim();
    const issued = await act(`issuing a ${fields.kind} key`, () => api("POST", "/v1/admin/keys", body));
    if (issued) {
      form.reset();
      showSecret(`Key ${issued.id} (${issued.kind}, ${issued.service ?? issued.user}):`, issued.key);
    }
  });
  $("secret-dismiss").addEventListener("click", () => {
    $("secret-value").textContent = "";
    $("secret").hidden = true;
  });
  $("topic-filter").addEventListener("input", () => lastOverview && drawTopics(lastOverview.topics));
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token");
    try {
      await api("POST", "/v1/login", undefined, { Authorization: `Bearer ${token.value.trim()}` });
      token.value = "";
      $("login-error").textContent = "";
      lastCredentials = 0;
      await poll();
    } catch (error) {
      $("login-error").textContent =
        error.status === 401 ? "That is not this gateway's admin token." : `Cannot log in: ${error.message}`;
    }
  });
  $("logout").addEventListener("click", async () => {
    try {
      await api("POST", "/v1/logout");
    } catch {
      // Logged out either way: the cookie is cleared or was not valid.
    }
    showLogin("logged out");
  });
  $("tail-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (tail) stopTail();
    else startTail(formFields(event.target));
  });
}

// --- live tail --------------------------------------------------------------------------------

let tail = null;

function tailState(state, text) {
  const node = $("tail-state");
  node.dataset.state = state;
  node.textContent = text;
}

function stopTail() {
  if (!tail) return;
  tail.source.close();
  tail = null;
  $("tail-button").textContent = "follow";
  tailState("stopped", "stopped");
}

/** Follows /v1/stream with the session cookie. A stream the gateway refuses (a bad filter,
 * an unknown topic) makes EventSource close without saying why; the same request then, by
 * fetch, gets the gateway's reason (refused before any stream starts, so it costs none). */
function startTail(fields) {
  const query = new URLSearchParams();
  for (const filter of list(fields.filter)) query.append("filter", filter);
  for (const topic of list(fields.topics)) query.append("topics", topic);
  query.set("sse_events", "message");
  const url = `/v1/stream?${query}`;
  const grep = fields.grep.trim();
  const source = new EventSource(url);
  const mine = { source, count: 0, opened: false };
  tail = mine;
  $("tail-button").textContent = "stop";
  tailState("connecting", "connecting");
  source.addEventListener("open", () => {
    mine.opened = true;
    tailState("live", `live · ${mine.count} events`);
  });
  source.addEventListener("error", async () => {
    if (source.readyState !== EventSource.CLOSED) {
      tailState("reconnecting", "reconnecting (resumes from its cursor)");
      return;
    }
    const reason = await refusal(url);
    if (tail !== mine) return;
    stopTail();
    tailState("error", reason);
  });
  source.addEventListener("disconnect", (event) => {
    const reason = JSON.parse(event.data ?? "{}");
    tailState("reconnecting", `dropped (${reason.code ?? "?"}); resuming`);
  });
  source.addEventListener("message", (event) => {
    mine.count += 1;
    tailState("live", `live · ${mine.count} events`);
    if (grep && !event.data.includes(grep)) return;
    addTailRow(JSON.parse(event.data));
  });
}

/** Why the gateway refuses `url` (asked once more, by fetch). */
async function refusal(url) {
  try {
    const response = await fetch(url, { credentials: "same-origin" });
    if (response.ok) {
      // It answers now: a refusal that passed (the gateway was restarting, say).
      response.body?.cancel();
      return "the stream ended; follow again";
    }
    const answer = await response.json().catch(() => ({}));
    if (response.status === 401 || response.status === 403) showLogin("the session ended: log in again");
    return `refused: ${answer.message ?? response.status}`;
  } catch (error) {
    return `cannot reach the gateway: ${error.message}`;
  }
}

function addTailRow(event) {
  const message = event.value?.payload?.message ?? "";
  const row = el(
    "li",
    { "data-key": `${event.topic}/${event.partition}/${event.offset}` },
    el("time", {}, new Date(event.timestamp).toLocaleTimeString("en-GB")),
    el("span", { class: "coords mono" }, `${event.topic}/${event.partition}/${event.offset}`),
    el("span", { class: "sender" }, `${event.service}:${event.action}`),
    el("span", { class: "key mono" }, event.key ?? ""),
    el("span", { class: "message" }, message || JSON.stringify(event.value).slice(0, 160)),
  );
  const rows = $("tail");
  rows.prepend(row);
  while (rows.children.length > TAIL_ROWS) rows.lastElementChild.remove();
}

// --- start --------------------------------------------------------------------------------------

wireForms();
poll();
