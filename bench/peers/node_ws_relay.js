'use strict';
// Minimal Node relay used as a benchmark peer: one upstream websocket, every
// frame broadcast unchanged to the clients of ws://HOST:PORT/relay.
//
// Written the way the `ws` documentation broadcasts: permessage-deflate off, and
// a client whose bufferedAmount exceeds --max-buffered bytes misses frames
// until it catches up. It sends no messages of its own and does not reconnect
// an upstream that closes: a benchmark run treats that as a failure.
//
// Usage: node node_ws_relay.js --upstream URL --port PORT [--host 127.0.0.1]
//        [--max-buffered BYTES]
// PORT and BACKPACK_WS_URL in the environment set the same values.

const http = require('http');
const WebSocket = require('ws');

function parseArgs(argv) {
  const options = {
    upstream: process.env.BACKPACK_WS_URL || null,
    port: Number(process.env.PORT || 3001),
    host: '127.0.0.1',
    maxBuffered: 4 * 1024 * 1024,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const value = argv[i + 1];
    switch (argv[i]) {
      case '--upstream': options.upstream = value; break;
      case '--port': options.port = Number(value); break;
      case '--host': options.host = value; break;
      case '--max-buffered': options.maxBuffered = Number(value); break;
      default:
        throw new Error(`unknown option ${argv[i]}; expected --upstream, --port, --host, --max-buffered`);
    }
  }
  if (!options.upstream) throw new Error('missing upstream URL: pass --upstream or set BACKPACK_WS_URL');
  return options;
}

function main() {
  const options = parseArgs(process.argv.slice(2));
  let skipped = 0;

  const server = http.createServer((request, response) => {
    response.writeHead(404).end();
  });
  const clients = new WebSocket.Server({ server, path: '/relay', perMessageDeflate: false });

  const upstream = new WebSocket(options.upstream, { perMessageDeflate: false, maxPayload: 0 });
  upstream.on('message', (data, isBinary) => {
    for (const client of clients.clients) {
      if (client.readyState !== WebSocket.OPEN) continue;
      if (client.bufferedAmount > options.maxBuffered) {
        skipped++;
        continue;
      }
      client.send(data, { binary: isBinary });
    }
  });
  upstream.on('open', () => console.error(`node_ws_relay: upstream ${options.upstream} open`));
  upstream.on('error', (error) => console.error(`node_ws_relay: upstream error: ${error.message}`));
  upstream.on('close', (code) => {
    console.error(`node_ws_relay: upstream closed with code ${code}; ${skipped} sends skipped`);
    process.exit(1);
  });

  server.listen(options.port, options.host, () => {
    console.error(`node_ws_relay: listening on ws://${options.host}:${options.port}/relay`);
  });
  process.on('SIGTERM', () => {
    console.error(`node_ws_relay: stopping; ${skipped} sends skipped`);
    process.exit(0);
  });
}

main();
