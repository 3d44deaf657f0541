// What the echo page and the two Node echo scripts share: the query string of a stream, telling
// a new event from one already shown, one line per event, the reconnect delay and an SSE parser.
// A plain ES module with no dependencies: browsers and Node 20 import it as it is.

/** "lk:*, arm:update_user" (commas, spaces or new lines between) as a list, empty parts dropped. */
export function splitList(text) {
  return String(text ?? "")
    .split(/[\s,]+/)
    .map((part) => part.trim())
    .filter(Boolean);
}

/**
 * The query string of `/v1/stream` or `/v1/ws`: the filters, the topics, where to start
 * (`positionName` is `last_event_id` for SSE and `from` for WebSocket), and `extra` pairs
 * (`ticket`, `sse_events`). An empty position asks for `now`.
 */
export function streamQuery({ filters, topics = [], position, positionName = "from", extra = {} }) {
  const query = new URLSearchParams();
  for (const filter of filters) query.append("filter", filter);
  if (topics.length) query.set("topics", topics.join(","));
  if (position) query.set(positionName, position);
  for (const [name, value] of Object.entries(extra)) {
    if (value !== undefined && value !== null && value !== "") query.set(name, value);
  }
  return query.toString();
}

/**
 * Remembers the highest offset shown per topic and partition: the gateway delivers each
 * partition in offset order, so an event at or below it was shown already (a resumed stream
 * never repeats one, but a page must not show one twice even if it did).
 */
export class Seen {
  #last = new Map();

  /** True, and remembered, when the event was not shown yet. */
  admit(event) {
    const partition = `${event.topic}/${event.partition}`;
    const last = this.#last.get(partition);
    if (last !== undefined && event.offset <= last) return false;
    this.#last.set(partition, event.offset);
    return true;
  }
}

/** What a person reads of an event frame's data (the gateway's event JSON). */
export function describe(data) {
  const value = data?.value;
  const envelope = value && typeof value === "object" ? value : {};
  let message = envelope.payload?.message;
  if (message === undefined) message = value === undefined ? data?.reason ?? "" : JSON.stringify(value);
  return {
    service: data?.service ?? envelope.service ?? "?",
    action: data?.action ?? envelope.action ?? "?",
    topic: data?.topic ?? "?",
    partition: data?.partition ?? "?",
    offset: data?.offset ?? "?",
    key: data?.key ?? null,
    timestamp: data?.timestamp ?? null,
    message: String(message),
  };
}

/** One line per event: `sse lk:create_user orders/2@17 key=u1 "user created"`. */
export function line(transport, data) {
  const event = describe(data);
  const key = event.key === null ? "" : ` key=${event.key}`;
  return `${transport} ${event.service}:${event.action} ${event.topic}/${event.partition}@${event.offset}${key} ${JSON.stringify(event.message)}`;
}

/** Reconnect delays: from `first` ms doubling up to `max`, with jitter; `reset` once connected. */
export class Backoff {
  constructor(first = 500, max = 10_000) {
    this.first = first;
    this.max = max;
    this.reset();
  }

  reset() {
    this.current = this.first;
  }

  next() {
    const delay = this.current * (0.75 + Math.random() / 2);
    this.current = Math.min(this.current * 2, this.max);
    return Math.round(delay);
  }
}

/**
 * Server-Sent Events as the EventSource specification parses them, for clients that read the
 * body themselves (Node's fetch). `push` takes text as it arrives and returns the complete
 * frames: `{ id, event, data }`, with `data` null for an id-only frame (a position).
 */
export class SseParser {
  #buffer = "";
  #id = null;
  #event = "";
  #data = [];
  #sawId = false;

  push(text) {
    this.#buffer += text;
    const frames = [];
    let newline;
    while ((newline = this.#buffer.search(/\r\n|\r|\n/)) !== -1) {
      // A lone \r at the end may be the first half of \r\n: wait for the next chunk.
      if (this.#buffer[newline] === "\r" && newline === this.#buffer.length - 1) break;
      const width = this.#buffer.startsWith("\r\n", newline) ? 2 : 1;
      const text = this.#buffer.slice(0, newline);
      this.#buffer = this.#buffer.slice(newline + width);
      const frame = this.#line(text);
      if (frame) frames.push(frame);
    }
    return frames;
  }

  #line(text) {
    if (text === "") {
      const frame = this.#data.length || this.#sawId
        ? { id: this.#id, event: this.#event || "message", data: this.#data.length ? this.#data.join("\n") : null }
        : null;
      this.#event = "";
      this.#data = [];
      this.#sawId = false;
      return frame;
    }
    if (text.startsWith(":")) return null; // a comment: the keep-alive
    const colon = text.indexOf(":");
    const field = colon === -1 ? text : text.slice(0, colon);
    let value = colon === -1 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "id" && !value.includes("\0")) {
      this.#id = value;
      this.#sawId = true;
    } else if (field === "event") {
      this.#event = value;
    } else if (field === "data") {
      this.#data.push(value);
    }
    return null;
  }
}
