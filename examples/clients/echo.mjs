// The echo page: asks the gateway for a short-lived ticket with the credential typed in, then
// follows the filters over an EventSource and a WebSocket at once, each in its own list.
//
// Each stream keeps its cursor (the id of the last frame it saw) and, when it ends or fails,
// reconnects by itself with a fresh ticket and that cursor (`last_event_id=` for SSE, `from=`
// for WebSocket), so it misses nothing. Only the ticket ever goes into a stream's URL.

import { Backoff, Seen, describe, line, splitList, streamQuery } from "./echo-core.mjs";

/** Rows kept per list; older ones drop off the end (the count keeps counting). */
const MAX_ROWS = 2000;

/** Query-string (or #fragment) names of the settings; the fragment never reaches a server. */
const SECRET_PARAMETERS = ["credential", "key", "token", "password"];

/** A refusal worth stopping for (a wrong credential, a bad filter), not a passing failure. */
class Refused extends Error {}

/** `Authorization` for the ticket request: Basic for a user and password, else Bearer. */
function authorization({ user, credential }) {
  if (!user) return `Bearer ${credential}`;
  const bytes = new TextEncoder().encode(`${user}:${credential}`);
  return `Basic ${btoa(String.fromCharCode(...bytes))}`;
}

/** The reason in a gateway's JSON error answer, or its status. */
async function reason(response) {
  const body = await response.json().catch(() => null);
  return body?.message ? `${body.error ?? response.status}: ${body.message}` : `HTTP ${response.status}`;
}

/** A ticket for one connection (`POST /v1/tickets`); Refused when the credential is refused. */
async function fetchTicket(settings) {
  let response;
  try {
    response = await fetch(new URL("v1/tickets", document.baseURI), {
      method: "POST",
      headers: { authorization: authorization(settings) },
      cache: "no-store",
    });
  } catch {
    throw new Error("the gateway does not answer");
  }
  if (response.status === 401 || response.status === 403) throw new Refused(await reason(response));
  if (!response.ok) throw new Error(`no ticket: ${await reason(response)}`);
  return (await response.json()).ticket;
}

/**
 * Why a stream that never started was refused: the same request over plain HTTP, whose answer
 * an EventSource or WebSocket does not show. Refused for a 4xx; nothing when it would work now.
 */
async function diagnose(settings, position) {
  const ticket = await fetchTicket(settings);
  const query = streamQuery({
    filters: settings.filters,
    topics: settings.topics,
    position,
    positionName: "last_event_id",
    extra: { ticket },
  });
  const abort = new AbortController();
  const response = await fetch(new URL(`v1/stream?${query}`, document.baseURI), {
    signal: abort.signal,
    cache: "no-store",
  });
  if (response.ok) {
    abort.abort();
    return;
  }
  const why = await reason(response);
  if (response.status >= 400 && response.status < 500) throw new Refused(why);
  throw new Error(why);
}

/** One transport's panel: its state, figures, cursor and list of events. */
class Panel {
  constructor(section) {
    this.section = section;
    section.append(document.getElementById("transport-panel").content.cloneNode(true));
    section.querySelector(".title").textContent = section.dataset.title;
    section.querySelector(".path").textContent = section.dataset.path;
    section.querySelector(".events").ariaLabel = `events received over ${section.dataset.title}`;
    this.list = section.querySelector(".events");
    this.stateText = section.querySelector(".state");
    this.detailText = section.querySelector(".detail");
    this.cursorText = section.querySelector(".cursor code");
    this.figures = {
      events: section.querySelector(".events-count"),
      reconnects: section.querySelector(".reconnects"),
      repeats: section.querySelector(".repeats"),
    };
    this.row = document.getElementById("event-row");
    this.reset();
  }

  reset() {
    this.counts = { events: 0, reconnects: 0, repeats: 0 };
    this.list.replaceChildren();
    for (const name of Object.keys(this.counts)) this.figures[name].textContent = "0";
    this.cursor(null);
  }

  bump(name) {
    this.counts[name] += 1;
    this.figures[name].textContent = this.counts[name].toLocaleString();
  }

  state(state, detail) {
    this.section.dataset.state = state;
    this.stateText.textContent = state;
    this.detailText.textContent = detail;
  }

  cursor(id) {
    this.cursorText.textContent = id || "—";
    this.cursorText.title = id || "";
  }

  add(data) {
    const event = describe(data);
    const item = this.row.content.firstElementChild.cloneNode(true);
    item.dataset.key = `${event.topic}/${event.partition}/${event.offset}`;
    item.querySelector(".service").textContent = event.service;
    item.querySelector(".action").textContent = event.action;
    item.querySelector(".where").textContent = `${event.topic} · p${event.partition} · #${event.offset}`;
    item.querySelector(".message").textContent = event.message;
    const time = item.querySelector("time");
    const when = event.timestamp ? new Date(event.timestamp) : null;
    if (when && !Number.isNaN(when.getTime())) {
      time.dateTime = when.toISOString();
      time.textContent = when.toLocaleTimeString([], { hour12: false });
    }
    this.list.prepend(item);
    while (this.list.childElementCount > MAX_ROWS) this.list.lastElementChild.remove();
    this.bump("events");
  }
}

/** One subscription over one transport, reconnecting until stopped. */
class Follower {
  constructor(transport, panel, changed) {
    this.transport = transport; // "sse" or "ws"
    this.panel = panel;
    this.changed = changed; // called when it starts or stops following
    this.running = false;
    this.generation = 0; // bumped whenever a connection is replaced: late callbacks of old ones are ignored
    this.connection = null;
    this.timer = null;
  }

  start(settings) {
    this.stop();
    this.settings = settings;
    this.cursor = settings.from === "now" ? "" : settings.from;
    this.seen = new Seen();
    this.backoff = new Backoff();
    this.panel.reset();
    this.running = true;
    this.changed();
    this.connect();
  }

  stop(detail = "Not connected.") {
    this.generation += 1;
    clearTimeout(this.timer);
    this.connection?.close();
    this.connection = null;
    this.panel.state("idle", detail);
    this.running = false;
    this.changed();
  }

  async connect() {
    const generation = ++this.generation;
    this.live = false;
    this.lastWord = "";
    this.panel.state("connecting", "Asking the gateway for a ticket…");
    let ticket;
    try {
      ticket = await fetchTicket(this.settings);
    } catch (error) {
      if (generation === this.generation) this.failed(generation, error);
      return;
    }
    if (generation !== this.generation) return;
    const sse = this.transport === "sse";
    const query = streamQuery({
      filters: this.settings.filters,
      topics: this.settings.topics,
      position: this.cursor,
      positionName: sse ? "last_event_id" : "from",
      // An EventSource sees only the event names it listens for: ask for `message` and `position`.
      extra: { ticket, sse_events: sse ? "message" : undefined },
    });
    this.panel.state("connecting", this.cursor ? "Resuming from the cursor…" : "Opening the stream…");
    this.connection = sse ? this.openSse(generation, query) : this.openWs(generation, query);
  }

  openSse(generation, query) {
    const source = new EventSource(new URL(`v1/stream?${query}`, document.baseURI));
    const current = () => generation === this.generation;
    source.addEventListener("position", (message) => current() && this.position(message.lastEventId));
    source.addEventListener("message", (message) => {
      if (current()) this.event(message.lastEventId, parse(message.data));
    });
    source.addEventListener("notice", (message) => current() && this.notice(parse(message.data)));
    source.addEventListener("disconnect", (message) => {
      const end = parse(message.data);
      if (current()) this.lastWord = `${end.code}: ${end.reason}`;
    });
    // The browser would retry with the URL's old ticket: close, and reconnect with a fresh one.
    source.addEventListener("error", () => {
      if (current()) this.lost(generation, this.lastWord || "the stream broke off");
    });
    return source;
  }

  openWs(generation, query) {
    const url = new URL(`v1/ws?${query}`, document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(url);
    const current = () => generation === this.generation;
    socket.addEventListener("message", (message) => {
      if (!current()) return;
      const frame = parse(message.data);
      if (frame.type === "event") this.event(frame.id, frame.data);
      else if (frame.type === "position") this.position(frame.id);
      else if (frame.type === "notice") this.notice(frame);
      else if (frame.type === "disconnect") this.lastWord = `${frame.code}: ${frame.reason}`;
    });
    socket.addEventListener("close", (close) => {
      if (!current()) return;
      const said = close.reason ? `closed ${close.code}: ${close.reason}` : `the connection broke off (${close.code})`;
      this.lost(generation, this.lastWord || said);
    });
    return socket;
  }

  /** A position or event frame: the stream is live, and this is where it resumes. */
  position(id) {
    if (id) {
      this.cursor = id;
      this.panel.cursor(id);
    }
    if (!this.live) {
      this.live = true;
      this.backoff.reset();
      const filters = this.settings.filters.join(", ");
      this.panel.state("live", `Following ${filters} since ${new Date().toLocaleTimeString([], { hour12: false })}.`);
    }
  }

  event(id, data) {
    this.position(id);
    if (!this.seen.admit(data)) {
      this.panel.bump("repeats");
      return;
    }
    this.panel.add(data);
    console.log(line(this.transport, data));
  }

  notice(frame) {
    console.info(`${this.transport} notice ${frame.kind}: ${frame.message}`);
    this.panel.state(this.panel.section.dataset.state, `Notice (${frame.kind}): ${frame.message}`);
  }

  /** The connection ended: find out why if it never started, then reconnect after a pause. */
  async lost(generation, why) {
    this.connection?.close();
    this.connection = null;
    console.warn(`${this.transport} disconnected: ${why}`);
    if (!this.live) {
      try {
        await diagnose(this.settings, this.cursor);
      } catch (error) {
        if (generation === this.generation) this.failed(generation, error);
        return;
      }
    }
    if (generation === this.generation) this.retry(why);
  }

  failed(generation, error) {
    if (error instanceof Refused) {
      this.stop(`Refused: ${error.message}`);
      this.panel.state("refused", `Refused: ${error.message}`);
      showProblem(error.message);
    } else {
      this.retry(error.message);
    }
  }

  retry(why) {
    const generation = ++this.generation;
    const delay = this.backoff.next();
    this.panel.state("retrying", `${why} — reconnecting in ${(delay / 1000).toFixed(1)} s.`);
    this.timer = setTimeout(() => {
      if (generation !== this.generation) return;
      this.panel.bump("reconnects");
      this.connect();
    }, delay);
  }
}

/** A frame's JSON; a frame that is not JSON is shown as it is. */
function parse(text) {
  try {
    return JSON.parse(text);
  } catch {
    return { reason: String(text) };
  }
}

function showProblem(message) {
  const problem = document.getElementById("problem");
  problem.textContent = message;
  problem.hidden = !message;
}

/** The settings of the URL: its query string, then its #fragment (which wins). */
function urlSettings() {
  const parameters = new URLSearchParams(location.search);
  for (const [name, value] of new URLSearchParams(location.hash.slice(1))) parameters.append(name, value);
  const last = (...names) => names.map((name) => parameters.getAll(name).at(-1)).find((v) => v !== undefined);
  const found = {
    credential: last(...SECRET_PARAMETERS),
    user: last("user"),
    filter: parameters.getAll("filter").join(", ") || undefined,
    topics: last("topics", "topic"),
    from: last("from"),
    autostart: ["1", "true", "yes"].includes(last("autostart")),
  };
  // The secret is in the form now: keep it out of the address bar and the history.
  if (SECRET_PARAMETERS.some((name) => parameters.has(name))) {
    const clean = new URL(location.href);
    for (const name of SECRET_PARAMETERS) clean.searchParams.delete(name);
    const fragment = new URLSearchParams(location.hash.slice(1));
    for (const name of SECRET_PARAMETERS) fragment.delete(name);
    clean.hash = fragment.toString();
    history.replaceState(null, "", clean);
  }
  return found;
}

function formSettings(form) {
  const value = (name) => form.elements[name].value.trim();
  return {
    credential: form.elements.credential.value,
    user: value("user"),
    filters: splitList(value("filter")),
    topics: splitList(value("topics")),
    from: value("from") || "now",
  };
}

function main() {
  const form = document.getElementById("settings");
  const followers = [];
  // The buttons say whether anything is being followed.
  const changed = () => {
    const on = followers.some((follower) => follower.running);
    document.getElementById("disconnect").disabled = !on;
    document.getElementById("connect").textContent = on ? "Reconnect" : "Connect";
  };
  for (const transport of ["sse", "ws"]) {
    followers.push(new Follower(transport, new Panel(document.getElementById(transport)), changed));
  }
  form.addEventListener("submit", (submit) => {
    submit.preventDefault();
    const settings = formSettings(form);
    const missing = !settings.credential ? "a credential" : !settings.filters.length ? "a filter" : "";
    showProblem(missing ? `Give ${missing} first.` : "");
    if (missing) return;
    for (const follower of followers) follower.start(settings);
  });
  document.getElementById("disconnect").addEventListener("click", () => {
    for (const follower of followers) follower.stop();
  });
  document.getElementById("clear").addEventListener("click", () => {
    for (const follower of followers) follower.panel.list.replaceChildren();
  });

  const found = urlSettings();
  for (const name of ["credential", "user", "filter", "topics", "from"]) {
    if (found[name] !== undefined) form.elements[name].value = found[name];
  }
  if (found.autostart) form.requestSubmit();
}

main();
