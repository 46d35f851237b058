'use strict';
// Load generator for the relay benchmark: opens N websocket clients to one
// relay and checks every frame they receive.
//
// Upstream frames are JSON arrays (first byte "["). The fake upstream writes
// the frame's sequence number into the last 6 hex digits of the first event's
// id (byte offsets 26-32), so a client knows which frame it got even when the
// relay skipped some. Every other byte must equal the source frame
// frames[index % frames.length], or the delivery counts as a mismatch.
// Frames starting with "{" are the relay's own JSON messages and are only
// counted by their "type".
//
// Two client implementations check the same things:
//   raw (default)  a minimal RFC 6455 client on net.Socket. It compares each
//                  chunk of a frame with the source as the chunk arrives and
//                  keeps no per-message buffer. It offers permessage-deflate
//                  like a browser (unless --no-deflate) but cannot inflate,
//                  so a server that accepts the offer fails the handshake.
//   ws             the `ws` package's client, which handles deflate and
//                  fragmentation in full. It costs about 1.4 times the CPU
//                  per MB: 54 % against 38 % of a core at 100 clients x 200
//                  frames/s from the Node peer, on 2 cores.
//
// Driven by one-line commands on stdin, reports JSON lines on stdout:
//   begin            start the measurement window (CPU, event-loop use)
//   expect COUNT     the upstream sent COUNT frames; report "drained" once every
//                    client has frame COUNT-1, or no frame came for --quiet-ms
//   stop FILE        read the upstream's send times (float64 ns per index,
//                    CLOCK_MONOTONIC), report "result", close and exit
//
// Receive times come from process.hrtime, which reads CLOCK_MONOTONIC on Linux,
// the same clock as Python's time.monotonic_ns() in the fake upstream.

const crypto = require('crypto');
const fs = require('fs');
const net = require('net');
const readline = require('readline');
const { performance } = require('perf_hooks');
const WebSocket = require('ws');

const STAMP_START = 26;
const STAMP_END = 32;
const OPEN_BRACKET = 0x5b; // "["
const OPEN_BRACE = 0x7b; // "{"
// Frames at least this long (the ~1 MB batches) get their own latency summary.
const LARGE_FRAME_BYTES = 256 * 1024;

function parseArgs(argv) {
  const options = {
    url: null,
    clients: 10,
    frames: null,
    connectConcurrency: 50,
    connectTimeoutMs: 10000,
    deflate: true,
    quietMs: 1000,
    client: 'raw',
  };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i];
    const value = argv[i + 1];
    switch (name) {
      case '--url': options.url = value; i++; break;
      case '--clients': options.clients = Number(value); i++; break;
      case '--frames': options.frames = value; i++; break;
      case '--connect-concurrency': options.connectConcurrency = Number(value); i++; break;
      case '--connect-timeout-ms': options.connectTimeoutMs = Number(value); i++; break;
      case '--quiet-ms': options.quietMs = Number(value); i++; break;
      case '--deflate': options.deflate = true; break;
      case '--no-deflate': options.deflate = false; break;
      case '--client': options.client = value; i++; break;
      default:
        throw new Error(`unknown option ${name}; expected --url, --clients, --frames, ` +
          '--connect-concurrency, --connect-timeout-ms, --quiet-ms, --[no-]deflate, --client');
    }
  }
  if (options.client !== 'raw' && options.client !== 'ws') {
    throw new Error(`--client must be raw or ws, got ${options.client}`);
  }
  if (!options.url || !options.frames) throw new Error('--url and --frames are required');
  if (!(options.clients >= 1)) throw new Error(`--clients must be at least 1, got ${options.clients}`);
  return options;
}

function report(event, fields) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
}

function readFrames(path) {
  const data = fs.readFileSync(path);
  const frames = [];
  let start = 0;
  while (start < data.length) {
    let end = data.indexOf(0x0a, start);
    if (end === -1) end = data.length;
    if (end > start) frames.push(data.subarray(start, end));
    start = end + 1;
  }
  if (frames.length === 0) throw new Error(`${path}: no frames found`);
  return frames;
}

function nowNs() {
  return Number(process.hrtime.bigint());
}

// Return the sequence number written as 6 lowercase hex digits at
// STAMP_START, or -1 if those bytes are not lowercase hex.
function readStamp(data, offset) {
  let value = 0;
  for (let i = offset + STAMP_START; i < offset + STAMP_END; i++) {
    const c = data[i];
    let digit;
    if (c >= 0x30 && c <= 0x39) digit = c - 0x30;
    else if (c >= 0x61 && c <= 0x66) digit = c - 0x61 + 10;
    else return -1;
    value = value * 16 + digit;
  }
  return value;
}

// Growable typed arrays holding one entry per delivered frame.
class Deliveries {
  constructor() {
    this.length = 0;
    this.indexes = new Uint32Array(1 << 16);
    this.times = new Float64Array(1 << 16);
  }

  push(index, timeNs) {
    if (this.length === this.indexes.length) {
      const indexes = new Uint32Array(this.length * 2);
      indexes.set(this.indexes);
      this.indexes = indexes;
      const times = new Float64Array(this.length * 2);
      times.set(this.times);
      this.times = times;
    }
    this.indexes[this.length] = index;
    this.times[this.length] = timeNs;
    this.length++;
  }
}

// Latencies in milliseconds, summarized as percentiles.
class LatencyStats {
  constructor(capacity) {
    this.values = new Float64Array(capacity);
    this.count = 0;
  }

  add(value) {
    this.values[this.count++] = value;
  }

  summary() {
    const n = this.count;
    if (n === 0) return { count: 0, p50: null, p90: null, p99: null, p999: null, max: null, mean: null };
    const sorted = this.values.subarray(0, n).sort();
    const percentile = (p) => sorted[Math.min(n - 1, Math.ceil((p / 100) * n) - 1)];
    let sum = 0;
    for (let k = 0; k < n; k++) sum += sorted[k];
    return {
      count: n,
      p50: percentile(50),
      p90: percentile(90),
      p99: percentile(99),
      p999: percentile(99.9),
      max: sorted[n - 1],
      mean: sum / n,
    };
  }
}

class LoadGenerator {
  constructor(options) {
    this.options = options;
    this.frames = readFrames(options.frames);
    this.sockets = [];
    this.lastIndex = [];
    this.deliveredPerClient = [];
    this.deliveries = new Deliveries();
    this.deliveredBytes = 0;
    this.mismatches = 0;
    this.outOfOrder = 0;
    this.binaryFrames = 0;
    this.otherFrames = 0;
    this.controlMessages = {};
    this.closesDuringRun = 0;
    this.closeCodes = {};
    this.connectFailures = 0;
    this.connectErrors = {};
    this.deflateNegotiated = 0;
    this.lastArrayFrameNs = 0;
    this.running = false;
    this.expectedCount = -1;
    this.drainTimer = null;
    this.window = null;
  }

  // Open every client, at most connectConcurrency handshakes at a time.
  connectAll() {
    const { clients, connectConcurrency } = this.options;
    const startNs = nowNs();
    let next = 0;
    let settled = 0;
    return new Promise((resolve) => {
      const openNext = () => {
        if (next >= clients) return;
        const id = next++;
        this.connectOne(id).then(() => {
          settled++;
          if (settled === clients) resolve((nowNs() - startNs) / 1e9);
          else openNext();
        });
      };
      for (let i = 0; i < Math.min(connectConcurrency, clients); i++) openNext();
    });
  }

  connectOne(id) {
    this.lastIndex[id] = -1;
    this.deliveredPerClient[id] = 0;
    const Client = this.options.client === 'raw' ? RawClient : WsClient;
    return new Client(this, id).connect();
  }

  onOpen(id, client, deflate) {
    this.sockets[id] = client;
    if (deflate) this.deflateNegotiated++;
  }

  onConnectFailure(reason) {
    this.connectFailures++;
    this.connectErrors[reason] = (this.connectErrors[reason] || 0) + 1;
  }

  onClose(id, code) {
    this.sockets[id] = null;
    this.closeCodes[code] = (this.closeCodes[code] || 0) + 1;
    if (this.running) this.closesDuringRun++;
  }

  onControlMessage(text) {
    let type = 'invalid-json';
    try {
      type = String(JSON.parse(text).type);
    } catch (error) {
      // Counted under "invalid-json".
    }
    this.controlMessages[type] = (this.controlMessages[type] || 0) + 1;
  }

  onBinaryFrame() {
    this.binaryFrames++;
    this.mismatches++;
  }

  onOtherFrame() {
    this.otherFrames++;
    this.mismatches++;
  }

  onMismatch() {
    this.mismatches++;
  }

  // Record one array frame whose bytes all matched source frame `index`.
  onDelivery(id, index, length, timeNs) {
    this.lastArrayFrameNs = timeNs;
    if (index <= this.lastIndex[id]) {
      this.outOfOrder++;
      return;
    }
    this.lastIndex[id] = index;
    this.deliveredPerClient[id]++;
    this.deliveredBytes += length;
    this.deliveries.push(index, timeNs);
    if (this.expectedCount >= 0 && index === this.expectedCount - 1) this.checkDrained();
  }

  begin() {
    this.running = true;
    this.window = {
      startNs: nowNs(),
      cpu: process.cpuUsage(),
      elu: performance.eventLoopUtilization(),
      endNs: null,
      cpuDelta: null,
      eluDelta: null,
    };
  }

  endWindow() {
    if (!this.window || this.window.endNs !== null) return;
    this.window.endNs = nowNs();
    this.window.cpuDelta = process.cpuUsage(this.window.cpu);
    this.window.eluDelta = performance.eventLoopUtilization(this.window.elu);
  }

  expect(count) {
    this.expectedCount = count;
    this.checkDrained();
    if (this.drainTimer === null) {
      this.drainTimer = setInterval(() => this.checkDrained(), 50);
    }
  }

  checkDrained() {
    if (this.expectedCount < 0) return;
    let complete = true;
    for (let id = 0; id < this.options.clients; id++) {
      if (this.sockets[id] && this.lastIndex[id] < this.expectedCount - 1) {
        complete = false;
        break;
      }
    }
    const quiet = nowNs() - this.lastArrayFrameNs > this.options.quietMs * 1e6;
    if (!complete && !quiet) return;
    clearInterval(this.drainTimer);
    this.drainTimer = null;
    this.expectedCount = -1;
    this.endWindow();
    report('drained', { reason: complete ? 'complete' : 'quiet' });
  }

  stop(sendTimesPath) {
    this.endWindow();
    this.running = false;
    const sendTimes = new Float64Array(new Uint8Array(fs.readFileSync(sendTimesPath)).buffer);
    report('result', this.summarize(sendTimes));
    for (const client of this.sockets) if (client) client.terminate();
    process.exit(0);
  }

  summarize(sendTimes) {
    const { deliveries, frames } = this;
    const sent = sendTimes.length;
    const all = new LatencyStats(deliveries.length);
    const large = new LatencyStats(deliveries.length);
    const small = new LatencyStats(deliveries.length);
    let firstReceiveNs = Infinity;
    let lastReceiveNs = 0;
    for (let k = 0; k < deliveries.length; k++) {
      const index = deliveries.indexes[k];
      const timeNs = deliveries.times[k];
      if (index >= sent) {
        this.mismatches++; // a sequence number the upstream never sent
        continue;
      }
      const latencyMs = (timeNs - sendTimes[index]) / 1e6;
      all.add(latencyMs);
      if (frames[index % frames.length].length >= LARGE_FRAME_BYTES) large.add(latencyMs);
      else small.add(latencyMs);
      if (timeNs < firstReceiveNs) firstReceiveNs = timeNs;
      if (timeNs > lastReceiveNs) lastReceiveNs = timeNs;
    }
    const counted = all.count;

    const connected = this.options.clients - this.connectFailures;
    const perClient = this.deliveredPerClient.filter((_, id) => id < this.options.clients);
    const window = this.window || {};
    const wallS = window.endNs ? (window.endNs - window.startNs) / 1e9 : null;
    const cpuS = window.cpuDelta ? (window.cpuDelta.user + window.cpuDelta.system) / 1e6 : null;
    return {
      clients: this.options.clients,
      connected,
      connect_failures: this.connectFailures,
      connect_errors: this.connectErrors,
      deflate_negotiated: this.deflateNegotiated,
      client: this.options.client,
      frames_sent: sent,
      deliveries: counted,
      expected_deliveries: sent * connected,
      delivered_bytes: this.deliveredBytes,
      mismatches: this.mismatches,
      out_of_order: this.outOfOrder,
      binary_frames: this.binaryFrames,
      other_frames: this.otherFrames,
      control_messages: this.controlMessages,
      closes_during_run: this.closesDuringRun,
      close_codes: this.closeCodes,
      min_client_deliveries: perClient.length ? Math.min(...perClient) : 0,
      max_client_deliveries: perClient.length ? Math.max(...perClient) : 0,
      first_receive_ns: counted ? firstReceiveNs : null,
      last_receive_ns: counted ? lastReceiveNs : null,
      latency_ms: all.summary(),
      latency_large_frames_ms: large.summary(),
      latency_small_frames_ms: small.summary(),
      self_cpu: {
        wall_s: wallS,
        cpu_s: cpuS,
        percent_of_core: wallS ? (100 * cpuS) / wallS : null,
        event_loop_utilization: window.eluDelta ? window.eluDelta.utilization : null,
      },
    };
  }
}

// Client built on the `ws` package: receives whole messages, then compares.
class WsClient {
  constructor(generator, id) {
    this.generator = generator;
    this.id = id;
    this.socket = null;
  }

  connect() {
    const { options } = this.generator;
    return new Promise((resolve) => {
      const socket = new WebSocket(options.url, {
        perMessageDeflate: options.deflate,
        skipUTF8Validation: true, // every byte is compared to the source frame
        handshakeTimeout: options.connectTimeoutMs,
        maxPayload: 0,
      });
      this.socket = socket;
      let opened = false;
      socket.on('open', () => {
        opened = true;
        const deflate = Boolean(socket.extensions && socket.extensions.includes('permessage-deflate'));
        this.generator.onOpen(this.id, this, deflate);
        resolve();
      });
      socket.on('message', (data, isBinary) => this.onMessage(data, isBinary));
      socket.on('error', (error) => {
        if (!opened) {
          this.generator.onConnectFailure(error.code || error.message);
          resolve();
        }
      });
      socket.on('close', (code) => {
        if (opened) this.generator.onClose(this.id, code);
      });
    });
  }

  onMessage(data, isBinary) {
    const timeNs = nowNs();
    const { generator } = this;
    if (isBinary) return generator.onBinaryFrame();
    const first = data[0];
    if (first === OPEN_BRACE) return generator.onControlMessage(data.toString('utf8'));
    if (first !== OPEN_BRACKET) return generator.onOtherFrame();
    const index = data.length > STAMP_END ? readStamp(data, 0) : -1;
    const source = index < 0 ? null : generator.frames[index % generator.frames.length];
    if (
      source === null ||
      data.length !== source.length ||
      data.compare(source, 0, STAMP_START, 0, STAMP_START) !== 0 ||
      data.compare(source, STAMP_END, source.length, STAMP_END, data.length) !== 0
    ) {
      return generator.onMismatch();
    }
    generator.onDelivery(this.id, index, data.length, timeNs);
  }

  terminate() {
    this.socket.terminate();
  }
}

const WEBSOCKET_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const OPCODE_TEXT = 0x1;
const OPCODE_BINARY = 0x2;
const OPCODE_CLOSE = 0x8;
const OPCODE_PING = 0x9;
const MAX_CONTROL_MESSAGE = 1 << 20;

// Kinds of message, decided by the opcode and the first payload byte.
const KIND_ARRAY = 1;
const KIND_CONTROL = 2;
const KIND_OTHER = 3;
const KIND_BINARY = 4;

// Minimal websocket client on a raw TCP socket. It parses frames as chunks
// arrive and compares array-frame payloads against the source in place.
class RawClient {
  constructor(generator, id) {
    this.generator = generator;
    this.id = id;
    this.socket = null;
    this.open = false;
    this.closeCode = null;
    this.handshake = Buffer.alloc(0);
    this.key = crypto.randomBytes(16).toString('base64');
    // Frame header being read (at most 14 bytes).
    this.header = Buffer.alloc(14);
    this.headerLength = 0;
    this.payloadRemaining = 0;
    this.inPayload = false;
    this.frameOpcode = 0;
    this.frameFin = false;
    this.controlPayload = [];
    // Message being read, which may span several frames.
    this.messageKind = 0;
    this.messageLength = 0;
    this.prefix = Buffer.alloc(STAMP_END);
    this.source = null;
    this.index = -1;
    this.bad = false;
    this.textParts = [];
    this.textLength = 0;
  }

  connect() {
    const { options } = this.generator;
    const url = new URL(options.url);
    return new Promise((resolve) => {
      let settled = false;
      const fail = (reason) => {
        if (settled) return;
        settled = true;
        this.generator.onConnectFailure(reason);
        this.socket.destroy();
        resolve();
      };
      const timer = setTimeout(() => fail('handshake timeout'), options.connectTimeoutMs);
      this.socket = net.connect(Number(url.port || 80), url.hostname);
      this.socket.setNoDelay(true);
      this.socket.on('connect', () => {
        const extensions = options.deflate
          ? 'Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n'
          : '';
        this.socket.write(
          `GET ${url.pathname}${url.search} HTTP/1.1\r\n` +
            `Host: ${url.host}\r\n` +
            'Upgrade: websocket\r\n' +
            'Connection: Upgrade\r\n' +
            `Sec-WebSocket-Key: ${this.key}\r\n` +
            'Sec-WebSocket-Version: 13\r\n' +
            extensions +
            '\r\n',
        );
      });
      this.socket.on('data', (chunk) => {
        if (this.open) return this.onData(chunk, 0);
        this.handshake = Buffer.concat([this.handshake, chunk]);
        const end = this.handshake.indexOf('\r\n\r\n');
        if (end === -1) return undefined;
        const problem = this.checkHandshake(this.handshake.toString('latin1', 0, end));
        if (problem) return fail(problem);
        clearTimeout(timer);
        settled = true;
        this.open = true;
        this.generator.onOpen(this.id, this, false);
        resolve();
        const rest = this.handshake.subarray(end + 4);
        this.handshake = null;
        if (rest.length) this.onData(rest, 0);
        return undefined;
      });
      this.socket.on('error', (error) => fail(error.code || error.message));
      this.socket.on('close', () => {
        clearTimeout(timer);
        if (this.open) {
          this.open = false;
          this.generator.onClose(this.id, this.closeCode || 1006);
        } else {
          fail('closed during handshake');
        }
      });
    });
  }

  // Return a reason the 101 response is unusable, or null if it is fine.
  checkHandshake(response) {
    const lines = response.split('\r\n');
    if (!/^HTTP\/1\.1 101 /.test(lines[0])) return `handshake rejected: ${lines[0]}`;
    const headers = {};
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(':');
      if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
    }
    const accept = crypto.createHash('sha1').update(this.key + WEBSOCKET_GUID).digest('base64');
    if (headers['sec-websocket-accept'] !== accept) return 'invalid Sec-WebSocket-Accept';
    if ((headers['sec-websocket-extensions'] || '').includes('permessage-deflate')) {
      return 'server accepted permessage-deflate, which the raw client cannot inflate: use --client ws';
    }
    return null;
  }

  onData(chunk, offset) {
    while (offset < chunk.length) {
      if (!this.inPayload) {
        offset = this.readHeader(chunk, offset);
        continue;
      }
      const end = Math.min(chunk.length, offset + this.payloadRemaining);
      if (this.frameOpcode >= OPCODE_CLOSE) this.controlPayload.push(chunk.subarray(offset, end));
      else this.onMessageBytes(chunk, offset, end);
      this.payloadRemaining -= end - offset;
      offset = end;
      if (this.payloadRemaining === 0) this.endFrame();
    }
  }

  // Consume header bytes from chunk[offset:] and return the new offset.
  readHeader(chunk, offset) {
    const { header } = this;
    while (offset < chunk.length && this.headerLength < 2) header[this.headerLength++] = chunk[offset++];
    if (this.headerLength < 2) return offset;
    const length7 = header[1] & 0x7f;
    const masked = (header[1] & 0x80) !== 0;
    let needed = 2;
    if (length7 === 126) needed += 2;
    else if (length7 === 127) needed += 8;
    if (masked) needed += 4;
    while (offset < chunk.length && this.headerLength < needed) header[this.headerLength++] = chunk[offset++];
    if (this.headerLength < needed) return offset;

    let length = length7;
    if (length7 === 126) length = header.readUInt16BE(2);
    else if (length7 === 127) length = Number(header.readBigUInt64BE(2));
    this.frameFin = (header[0] & 0x80) !== 0;
    this.frameOpcode = header[0] & 0x0f;
    this.headerLength = 0;
    this.payloadRemaining = length;
    this.inPayload = true;
    if (masked || (header[0] & 0x70) !== 0) this.generator.onMismatch(); // servers must not mask or set RSV bits
    if (this.frameOpcode === OPCODE_TEXT || this.frameOpcode === OPCODE_BINARY) {
      this.startMessage(this.frameOpcode);
    }
    if (length === 0) this.endFrame();
    return offset;
  }

  startMessage(opcode) {
    this.messageKind = opcode === OPCODE_BINARY ? KIND_BINARY : 0;
    this.messageLength = 0;
    this.source = null;
    this.index = -1;
    this.bad = false;
    this.textParts = [];
    this.textLength = 0;
  }

  onMessageBytes(chunk, start, end) {
    if (this.messageKind === 0) {
      const first = chunk[start];
      if (first === OPEN_BRACKET) this.messageKind = KIND_ARRAY;
      else if (first === OPEN_BRACE) this.messageKind = KIND_CONTROL;
      else this.messageKind = KIND_OTHER;
    }
    if (this.messageKind === KIND_CONTROL) {
      if (this.textLength < MAX_CONTROL_MESSAGE) this.textParts.push(Buffer.from(chunk.subarray(start, end)));
      this.textLength += end - start;
    } else if (this.messageKind === KIND_ARRAY) {
      this.compareArrayBytes(chunk, start, end);
    }
    this.messageLength += end - start;
  }

  // Compare chunk[start:end], which starts at byte this.messageLength of the
  // message, with the source frame. The first STAMP_END bytes pick the source.
  compareArrayBytes(chunk, start, end) {
    let position = this.messageLength;
    if (position < STAMP_END) {
      const take = Math.min(end - start, STAMP_END - position);
      chunk.copy(this.prefix, position, start, start + take);
      start += take;
      position += take;
      if (position === STAMP_END) this.selectSource();
    }
    if (start === end || this.bad) return;
    const source = this.source;
    if (position + (end - start) > source.length || chunk.compare(source, position, position + (end - start), start, end) !== 0) {
      this.bad = true;
    }
  }

  selectSource() {
    const index = readStamp(this.prefix, 0);
    const frames = this.generator.frames;
    const source = index < 0 ? null : frames[index % frames.length];
    if (source === null || source.length < STAMP_END || this.prefix.compare(source, 0, STAMP_START, 0, STAMP_START) !== 0) {
      this.bad = true;
      return;
    }
    this.index = index;
    this.source = source;
  }

  endFrame() {
    this.inPayload = false;
    const opcode = this.frameOpcode;
    if (opcode >= OPCODE_CLOSE) return this.onControlFrame(opcode, Buffer.concat(this.controlPayload));
    if (!this.frameFin) return undefined;
    const timeNs = nowNs();
    const { generator } = this;
    switch (this.messageKind) {
      case KIND_ARRAY:
        if (this.bad || this.source === null || this.messageLength !== this.source.length) {
          return generator.onMismatch();
        }
        return generator.onDelivery(this.id, this.index, this.messageLength, timeNs);
      case KIND_CONTROL:
        return generator.onControlMessage(Buffer.concat(this.textParts).toString('utf8'));
      case KIND_BINARY:
        return generator.onBinaryFrame();
      default:
        return generator.onOtherFrame();
    }
  }

  onControlFrame(opcode, payload) {
    this.controlPayload = [];
    if (opcode === OPCODE_PING) {
      this.sendFrame(0x8a, payload); // FIN + pong
    } else if (opcode === OPCODE_CLOSE) {
      this.closeCode = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      this.sendFrame(0x88, payload.subarray(0, 2)); // FIN + close, echoing the code
      this.socket.end();
    }
  }

  // Send a masked frame with a payload of at most 125 bytes.
  sendFrame(firstByte, payload) {
    const mask = crypto.randomBytes(4);
    const frame = Buffer.alloc(6 + payload.length);
    frame[0] = firstByte;
    frame[1] = 0x80 | payload.length;
    mask.copy(frame, 2);
    for (let i = 0; i < payload.length; i++) frame[6 + i] = payload[i] ^ mask[i & 3];
    if (!this.socket.destroyed) this.socket.write(frame);
  }

  terminate() {
    this.socket.destroy();
  }
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const generator = new LoadGenerator(options);
  const connectS = await generator.connectAll();
  report('ready', {
    clients: options.clients,
    connected: options.clients - generator.connectFailures,
    connect_failures: generator.connectFailures,
    connect_errors: generator.connectErrors,
    deflate_negotiated: generator.deflateNegotiated,
    connect_s: connectS,
  });

  const commands = readline.createInterface({ input: process.stdin });
  commands.on('line', (line) => {
    const words = line.trim().split(/\s+/);
    if (words[0] === 'begin') generator.begin();
    else if (words[0] === 'expect' && words.length === 2) generator.expect(Number(words[1]));
    else if (words[0] === 'stop' && words.length === 2) generator.stop(words[1]);
    else report('error', { message: `invalid command ${JSON.stringify(line)}` });
  });
  commands.on('close', () => process.exit(0));
}

main().catch((error) => {
  report('error', { message: String(error && error.stack ? error.stack : error) });
  process.exit(1);
});
