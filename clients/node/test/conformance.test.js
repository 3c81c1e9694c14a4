'use strict';
// The shared conformance scripts (clients/conformance/*.json, see the README there) played
// against this client by a fake broker on a Unix socket. The Rust and Python clients play the
// same scripts.
const test = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { Client, BrokerError, errorClassName, monotonicNs } = require('..');

const SCRIPTS = process.env.ELECTOR_CONFORMANCE_DIR || path.join(__dirname, '..', '..', 'conformance');
const STEP_TIMEOUT_MS = 5000;
/** How far a guarantee a client sends back (`"~$name"`) may be from the one it was given. */
const NEAR_NS = 100000000;

function normalize(e) {
  if (e.type === 'leader') {
    const out = { type: 'leader', leader: e.leader, term: e.term };
    if (e.unknown !== undefined) out.unknown = e.unknown;
    return out;
  }
  if (e.type === 'elected') return { type: 'elected', term: e.term };
  if (e.type === 'lost') return { type: 'lost', term: e.term, reason: e.reason };
  if (e.type === 'jeopardy' || e.type === 'safe') return { type: e.type, term: e.term };
  throw new Error(`not an event: ${JSON.stringify(e)}`);
}

function within(ms, promise, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(what)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

/** A fake broker: accepted connections, and each one's received lines. */
class FakeBroker {
  constructor(socketPath) {
    this.accepted = [];
    this.acceptWaiters = [];
    this.sockets = [];
    this.server = net.createServer((socket) => {
      this.sockets.push(socket);
      const conn = { socket, lines: [], waiters: [], closed: false, buf: '' };
      socket.on('data', (d) => {
        conn.buf += d.toString('utf8');
        let i;
        while ((i = conn.buf.indexOf('\n')) !== -1) {
          const line = conn.buf.slice(0, i);
          conn.buf = conn.buf.slice(i + 1);
          const w = conn.waiters.shift();
          if (w) w(line); else conn.lines.push(line);
        }
      });
      socket.on('close', () => {
        conn.closed = true;
        for (const w of conn.waiters.splice(0)) w(null);
      });
      socket.on('error', () => {});
      const w = this.acceptWaiters.shift();
      if (w) w(conn); else this.accepted.push(conn);
    });
    this.listening = new Promise((resolve) => this.server.listen(socketPath, resolve));
  }

  accept() {
    if (this.accepted.length) return Promise.resolve(this.accepted.shift());
    return within(STEP_TIMEOUT_MS, new Promise((r) => this.acceptWaiters.push(r)), 'the client did not connect');
  }

  static nextLine(conn, ms) {
    if (conn.lines.length) return Promise.resolve(conn.lines.shift());
    if (conn.closed) return Promise.resolve(null);
    let waiter;
    return within(ms, new Promise((r) => { waiter = r; conn.waiters.push(r); }), 'timeout').catch((e) => {
      const i = conn.waiters.indexOf(waiter);
      if (i >= 0) conn.waiters.splice(i, 1);
      throw e;
    });
  }
}

async function play(script) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'elector-node-'));
  const socketPath = path.join(dir, 'broker.sock');
  const broker = new FakeBroker(socketPath);
  await broker.listening;
  const client = new Client({ socket: socketPath });
  let connecting = null;
  let conn = null;
  // Connections a later `accept` replaced while the broker left them open.
  const earlier = [];
  const accept = async () => {
    const next = await broker.accept();
    if (conn) earlier.push(conn);
    conn = next;
  };
  const captures = {};
  const calls = {};
  const handles = {};
  const substitute = (v) => {
    if (typeof v === 'string' && v.startsWith('$')) {
      if (!(v.slice(1) in captures)) throw new Error(`nothing captured as ${v}`);
      return captures[v.slice(1)];
    }
    if (Array.isArray(v)) return v.map(substitute);
    if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, substitute(x)]));
    return v;
  };
  const connected = async () => {
    if (connecting) {
      await within(STEP_TIMEOUT_MS, connecting, 'connect did not finish');
      connecting = null;
    }
    return client;
  };
  const finish = async (handle) => {
    const result = await within(STEP_TIMEOUT_MS, calls[handle], `call ${handle} did not finish`);
    delete calls[handle];
    if (result) handles[handle] = result;
  };
  const write = (line) => {
    if (!conn) throw new Error('no connection is open');
    conn.socket.write(line + '\n');
  };
  const matches = (got, want) => {
    if (typeof want === 'string' && want.startsWith('~$')) {
      const target = substitute(want.slice(1));
      return Number.isInteger(got) && Math.abs(got - target) <= NEAR_NS;
    }
    return isDeepStrictEqual(got, want);
  };
  // A clock reading of the script as a BigInt. JSON numbers beyond 2^53 (104 days of uptime)
  // are rounded to a few ns, and the client takes such a deadline 1 µs early: so does this check.
  const instant = (name) => {
    const v = substitute(`$${name}`);
    if (!Number.isInteger(v)) throw new Error(`${name} is not a clock reading`);
    return BigInt(v) - (v > Number.MAX_SAFE_INTEGER ? 1000n : 0n);
  };
  const step = async (s) => {
    if ('clock' in s) {
      captures[s.clock.name] = Number(monotonicNs() + BigInt(s.clock.in_ms) * 1000000n);
    } else if ('connect' in s) {
      connecting = client.connect();
      connecting.catch(() => {});
      await accept();
    } else if ('accept' in s) {
      await accept();
    } else if ('send' in s) {
      write(JSON.stringify(substitute(s.send)));
    } else if ('send_raw' in s) {
      write(s.send_raw);
    } else if ('expect_request' in s) {
      let line;
      try {
        line = await FakeBroker.nextLine(conn, STEP_TIMEOUT_MS);
      } catch {
        throw new Error(`no request; expected ${JSON.stringify(s.expect_request)}`);
      }
      if (line === null) throw new Error(`connection closed; expected ${JSON.stringify(s.expect_request)}`);
      const got = JSON.parse(line);
      for (const [k, v] of Object.entries(s.expect_request)) {
        if (!(k in got) || !matches(got[k], v)) throw new Error(`request ${line} does not have ${k} = ${JSON.stringify(v)}`);
      }
      if (s.capture) captures[s.capture] = got.id;
    } else if ('expect_no_request' in s) {
      let line = null;
      try {
        line = await FakeBroker.nextLine(conn, s.expect_no_request.within_ms);
      } catch {
        return;
      }
      if (line !== null) throw new Error(`unexpected request ${line}`);
    } else if ('expect_closed' in s) {
      // Each earlier connection ends (the client closed it) with no request first.
      if (earlier.length === 0) throw new Error('no earlier connection is open');
      while (earlier.length) {
        let line;
        try {
          line = await FakeBroker.nextLine(earlier[0], STEP_TIMEOUT_MS);
        } catch {
          throw new Error('the client did not close its earlier connection');
        }
        if (line !== null) throw new Error(`the client sent ${line} on its earlier connection`);
        earlier.shift().socket.destroy();
      }
    } else if ('disconnect' in s) {
      if (conn) conn.socket.destroy();
      conn = null;
    } else if ('call' in s) {
      const a = s.call;
      let p;
      if (a.op === 'campaign') {
        await connected();
        p = client.campaign(a.election, { identity: a.identity, namespace: a.namespace, lock: a.lock });
      } else if (a.op === 'observe') {
        await connected();
        p = client.observe(a.election, { namespace: a.namespace, lock: a.lock });
      } else if (a.op === 'resign') {
        p = handles[a.handle].resign();
      } else {
        throw new Error(`unknown call op ${a.op}`);
      }
      p.catch(() => {});
      calls[a.handle] = p;
    } else if ('returns' in s) {
      await finish(s.returns);
    } else if ('raises' in s) {
      const { handle, code } = s.raises;
      let error = null;
      try {
        await finish(handle);
      } catch (e) {
        error = e;
      }
      if (!(error instanceof BrokerError)) throw new Error(`call ${handle}: expected ${code}, got ${error}`);
      if (error.code !== code) throw new Error(`call ${handle} raised ${error.code}, not ${code}`);
      if (error.name !== errorClassName(code)) throw new Error(`${code} raised as ${error.name}`);
    } else if ('expect_events' in s) {
      const { handle, events } = s.expect_events;
      for (const want of events) {
        let e;
        try {
          e = await handles[handle].nextEvent(STEP_TIMEOUT_MS);
        } catch {
          throw new Error(`no event on ${handle}; expected ${JSON.stringify(want)}`);
        }
        const arrived = monotonicNs();
        if (e === null) throw new Error(`events of ${handle} ended; expected ${JSON.stringify(want)}`);
        if (!isDeepStrictEqual(normalize(e), want)) {
          throw new Error(`event on ${handle}: got ${JSON.stringify(normalize(e))}, expected ${JSON.stringify(want)}`);
        }
        if (s.expect_events.not_before !== undefined) {
          const at = instant(s.expect_events.not_before);
          const late = BigInt(s.expect_events.late_ms ?? 1000) * 1000000n;
          if (arrived < at) throw new Error(`${JSON.stringify(want)} came ${Number(at - arrived) / 1e6} ms before ${s.expect_events.not_before}`);
          if (arrived > at + late) throw new Error(`${JSON.stringify(want)} came ${Number(arrived - at) / 1e6} ms after ${s.expect_events.not_before}`);
        }
      }
    } else if ('expect_no_events' in s) {
      const { handle, within_ms: ms } = s.expect_no_events;
      let e;
      try {
        e = await handles[handle].nextEvent(ms);
      } catch {
        return;
      }
      throw new Error(`unexpected event on ${handle}: ${e === null ? 'the end' : JSON.stringify(normalize(e))}`);
    } else if ('expect_state' in s) {
      const { handle, ...want } = s.expect_state;
      const c = handles[handle];
      const got = { is_leader: c.isLeader, jeopardy: c.jeopardy };
      for (const [k, v] of Object.entries(want)) {
        if (got[k] !== v) throw new Error(`state of ${handle} is ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
      }
    } else if ('expect_end' in s) {
      let e;
      try {
        e = await handles[s.expect_end].nextEvent(STEP_TIMEOUT_MS);
      } catch {
        throw new Error(`events of ${s.expect_end} did not end`);
      }
      if (e !== null) throw new Error(`events of ${s.expect_end} go on: ${JSON.stringify(normalize(e))}`);
    } else {
      throw new Error(`unknown step ${JSON.stringify(s)}`);
    }
  };
  try {
    for (const [i, s] of script.steps.entries()) {
      try {
        await step(s);
      } catch (e) {
        throw new Error(`step ${i} ${JSON.stringify(s)}: ${e.message}`);
      }
    }
  } finally {
    client.close();
    if (conn) conn.socket.destroy();
    for (const socket of broker.sockets) socket.destroy(); // connections the script never took up
    await new Promise((r) => broker.server.close(r));
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const { isDeepStrictEqual } = require('node:util');

const files = fs.readdirSync(SCRIPTS).filter((f) => f.endsWith('.json')).sort();

test('conformance scripts exist', () => {
  assert.ok(files.length >= 5, `no conformance scripts in ${SCRIPTS}`);
});

for (const file of files) {
  const script = JSON.parse(fs.readFileSync(path.join(SCRIPTS, file), 'utf8'));
  test(`conformance: ${script.name}`, async () => {
    if (script.known_divergences && 'node' in script.known_divergences) {
      await assert.rejects(play(script));
    } else {
      await play(script);
    }
  });
}
