#!/usr/bin/env -S node --experimental-websocket
// Follows a gateway subscription over WebSocket and prints each event as one line; after an
// error or a close it reconnects with its cursor (`from=`).
//
//   EVENTPIPE_KEY=ep_... node --experimental-websocket ws-echo.mjs --filter 'lk:*'
//
// Node 20 has a WebSocket client behind --experimental-websocket (Node 22 has it by default),
// and its constructor takes headers, so the key goes in Authorization: no dependencies.

import { streamQuery } from "./echo-core.mjs";
import { answerError, follow, streamRequest } from "./echo-cli.mjs";

if (typeof WebSocket === "undefined") {
  console.error("ws-echo.mjs: this Node has no WebSocket: run it with node --experimental-websocket (Node 20.10+)");
  process.exit(2);
}

/** One connection: resolves when the socket closes, throws when the gateway refuses it. */
async function connect(settings, cursor, stream) {
  const url = `${settings.gateway.replace(/^http/, "ws")}/v1/ws?${streamQuery({ ...settings, position: cursor })}`;
  let opened = false;
  // The gateway pings an idle socket (the WebSocket API answers them without showing them).
  const closed = await new Promise((resolve) => {
    const socket = new WebSocket(url, { headers: { authorization: `Bearer ${settings.key}` } });
    socket.addEventListener("message", (message) => {
      opened = true;
      const frame = JSON.parse(message.data);
      if (frame.type === "event") stream.event(frame.id, frame.data);
      else if (frame.type === "position") stream.position(frame.id);
      else if (frame.type === "notice") stream.notice(frame);
      else if (frame.type === "disconnect") stream.ended(frame.code, frame.reason);
    });
    socket.addEventListener("close", (close) => resolve(`closed ${close.code}${close.reason ? `: ${close.reason}` : ""}`));
    // Node 20 fires only `error` for a refused handshake, and no `close`.
    socket.addEventListener("error", (error) => resolve(error.message ?? "the socket failed"));
  });
  if (!opened) {
    // A refused handshake shows no status: ask the same over HTTP to learn why.
    const response = await streamRequest(settings, cursor, AbortSignal.timeout(10_000));
    if (!response.ok) throw await answerError(response);
    await response.body?.cancel();
  }
  return closed;
}

await follow("ws", connect);
