// What the two Node echo scripts share: their options (arguments, else environment), and the
// loop that follows a subscription for ever, reconnecting with its cursor and printing each new
// event as one line on stdout (connection news goes to stderr).

import { parseArgs } from "node:util";
import { Backoff, Seen, line, splitList, streamQuery } from "./echo-core.mjs";

const USAGE = `Options (each also from the environment variable after it):
  --gateway URL     the gateway's base URL             EVENTPIPE_GATEWAY  (http://127.0.0.1:19480)
  --key KEY         a consumer key or the admin token  EVENTPIPE_KEY      (required; prefer the variable:
                                                                           arguments show in ps)
  --filter F        SERVICE:ACTION, repeatable         EVENTPIPE_FILTER   (comma-separated; *:*)
  --topics A,B      only these topics                  EVENTPIPE_TOPICS   (all the gateway serves)
  --from POSITION   now, earliest, an RFC 3339 time or a cursor  EVENTPIPE_FROM (now)
  --count N         exit after N events                EVENTPIPE_COUNT    (never)`;

/** A refusal that no reconnect would change (a wrong key, a bad filter): the script stops. */
export class Refused extends Error {}

/** The options of `process.argv` and the environment; prints the usage and exits when wrong. */
export function options(script) {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        gateway: { type: "string" },
        key: { type: "string" },
        filter: { type: "string", multiple: true },
        topics: { type: "string" },
        from: { type: "string" },
        count: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    }).values;
  } catch (error) {
    usage(script, error.message);
  }
  if (parsed.help) usage(script);
  const env = process.env;
  const settings = {
    gateway: (parsed.gateway ?? env.EVENTPIPE_GATEWAY ?? "http://127.0.0.1:19480").replace(/\/+$/, ""),
    key: parsed.key ?? env.EVENTPIPE_KEY ?? "",
    filters: parsed.filter?.flatMap(splitList) ?? splitList(env.EVENTPIPE_FILTER ?? "*:*"),
    topics: splitList(parsed.topics ?? env.EVENTPIPE_TOPICS ?? ""),
    from: parsed.from ?? env.EVENTPIPE_FROM ?? "now",
    count: Number(parsed.count ?? env.EVENTPIPE_COUNT ?? 0),
  };
  if (!settings.key) usage(script, "give a key: --key or EVENTPIPE_KEY");
  if (!settings.filters.length) usage(script, "give a filter: --filter SERVICE:ACTION");
  if (!Number.isInteger(settings.count) || settings.count < 0) usage(script, "--count takes a whole number");
  if (!/^https?:\/\//.test(settings.gateway)) usage(script, "--gateway is an http:// or https:// URL");
  return settings;
}

function usage(script, problem) {
  const text = `Usage: ${script} [options]\n${USAGE}`;
  if (!problem) {
    console.log(text);
    process.exit(0);
  }
  console.error(`${script}: ${problem}\n${text}`);
  process.exit(2);
}

/** `GET /v1/stream` with the key, from `position`: its response (the SSE client's stream). */
export function streamRequest(settings, position, signal) {
  const query = streamQuery({ ...settings, position, positionName: "last_event_id" });
  return fetch(`${settings.gateway}/v1/stream?${query}`, {
    headers: { authorization: `Bearer ${settings.key}`, accept: "text/event-stream" },
    signal,
  });
}

/** A non-2xx answer as an error: Refused for a 4xx other than a timeout or too many requests. */
export async function answerError(response) {
  const body = await response.json().catch(() => null);
  const why = body?.message ? `${response.status} ${body.error}: ${body.message}` : `HTTP ${response.status}`;
  const final = response.status >= 400 && response.status < 500 && ![408, 429].includes(response.status);
  return final ? new Refused(why) : new Error(why);
}

/**
 * Follows the subscription for ever: `connect(settings, cursor, stream)` opens one connection
 * and resolves, with why, when it ends; it calls `stream.position(id)`, `stream.event(id, data)`,
 * `stream.notice(frame)` and `stream.ended(code, reason)` as frames arrive.
 */
export async function follow(transport, connect) {
  const settings = options(`${transport}-echo.mjs`);
  const seen = new Seen();
  const backoff = new Backoff();
  let cursor = settings.from === "now" ? "" : settings.from;
  let printed = 0;
  let lastWord = "";
  let live = false;
  const stream = {
    position(id) {
      if (id) cursor = id;
      if (!live) {
        live = true;
        backoff.reset();
        console.error(`${transport}: live`);
      }
    },
    event(id, data) {
      stream.position(id);
      if (!seen.admit(data)) return;
      console.log(line(transport, data));
      printed += 1;
      if (settings.count && printed >= settings.count) process.exit(0);
    },
    notice(frame) {
      console.error(`${transport}: notice ${frame.kind}: ${frame.message}`);
    },
    ended(code, reason) {
      lastWord = `${code}: ${reason}`;
    },
  };
  process.on("SIGINT", () => process.exit(130));
  for (;;) {
    lastWord = "";
    live = false;
    console.error(`${transport}: connecting to ${settings.gateway}${cursor ? " from the cursor" : ""}`);
    let why;
    try {
      why = await connect(settings, cursor, stream);
    } catch (error) {
      why = error.cause?.message ?? error.message;
      if (error instanceof Refused) {
        console.error(`${transport}: refused: ${why}`);
        process.exit(1);
      }
    }
    const delay = backoff.next();
    console.error(`${transport}: ${lastWord || why || "the stream ended"}; reconnecting in ${delay} ms`);
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}
