// Connect to the relay with the Node `ws` library, collect a given number of
// upstream frames (JSON arrays) and print one JSON line per frame with its
// opcode kind and SHA-256, then exit. Relay messages (JSON objects) are skipped.
// Usage: node node_client.js WS_URL FRAME_COUNT TIMEOUT_MS
"use strict";
const crypto = require("crypto");
const WebSocket = require("ws");

const [url, countText, timeoutText] = process.argv.slice(2);
const expected = Number(countText);
const timer = setTimeout(() => {
  console.error(`timed out with ${received} of ${expected} frames`);
  process.exit(2);
}, Number(timeoutText));

let received = 0;
const ws = new WebSocket(url, { perMessageDeflate: false });
ws.on("open", () => console.log(JSON.stringify({ open: true })));
ws.on("message", (data, isBinary) => {
  if (!isBinary && data.length && data[0] === 0x7b) return; // '{': a relay message
  const digest = crypto.createHash("sha256").update(data).digest("hex");
  console.log(JSON.stringify({ binary: isBinary, length: data.length, sha256: digest }));
  received += 1;
  if (received === expected) {
    clearTimeout(timer);
    ws.close(1000);
  }
});
ws.on("close", (code) => process.exit(received === expected ? 0 : 3));
ws.on("error", (error) => {
  console.error(String(error));
  process.exit(4);
});
