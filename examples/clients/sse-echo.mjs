#!/usr/bin/env node
// Follows a gateway subscription over Server-Sent Events and prints each event as one line;
// after an error or the end of the stream it reconnects with its cursor (`last_event_id=`).
//
//   EVENTPIPE_KEY=ep_... node sse-echo.mjs --gateway http://127.0.0.1:19480 --filter 'lk:*'
//
// Node 20's fetch reads the body as it arrives: no dependencies. `--help` lists the options.

import { SseParser } from "./echo-core.mjs";
import { answerError, follow, streamRequest } from "./echo-cli.mjs";

/** The gateway sends a keep-alive every 15 s: three missed and the connection is taken for dead. */
const IDLE_TIMEOUT_MS = 45_000;

/** Aborts `abort` when `touch` was not called for `ms`; `stop` ends the watch. */
function idleWatch(abort, ms = IDLE_TIMEOUT_MS) {
  let timer;
  const touch = () => {
    clearTimeout(timer);
    timer = setTimeout(() => abort.abort(new Error(`nothing heard for ${ms / 1000} s`)), ms);
  };
  touch();
  return { touch, stop: () => clearTimeout(timer) };
}

/** One connection: resolves when the stream ends, throws when it cannot open. */
async function connect(settings, cursor, stream) {
  const abort = new AbortController();
  const idle = idleWatch(abort);
  try {
    const response = await streamRequest(settings, cursor, abort.signal);
    if (!response.ok) throw await answerError(response);
    const parser = new SseParser();
    const decoder = new TextDecoder();
    for await (const chunk of response.body) {
      idle.touch();
      for (const frame of parser.push(decoder.decode(chunk, { stream: true }))) {
        if (frame.data === null) stream.position(frame.id);
        else if (frame.event === "notice") stream.notice(JSON.parse(frame.data));
        else if (frame.event === "disconnect") {
          const end = JSON.parse(frame.data);
          stream.ended(end.code, end.reason);
        } else stream.event(frame.id, JSON.parse(frame.data));
      }
    }
    return "the stream ended";
  } finally {
    idle.stop();
  }
}

await follow("sse", connect);
