'use strict';
// elector-client: leader election for Kubernetes apps through the node's elector broker
// (electord), over its Unix socket (PROTOCOL.md). No runtime dependencies.
//
// Guarantees (the same as the Rust and Python clients'):
// - a leader whose broker goes away keeps leading only on a guarantee it can check: a protocol
//   1.1 broker states `valid_until` on CLOCK_MONOTONIC with `elected` and every `renewed`, and
//   the greeting's `monotonic_now` shows whether this process reads the same clock. Then a
//   disconnect is a `jeopardy`: the campaign goes on leading, the client reconnects with
//   back-off and sends `resume`, and the jeopardy ends in `safe` (same term, fresh guarantee)
//   or `lost`: `broker_unavailable` exactly at `valid_until` (never later) if no broker
//   confirmed it, `preempted` if the broker refused. Without that guarantee (a 1.0 broker, a
//   clock of another time namespace, a guarantee already past) any disconnect means "not
//   leader" at once: `lost` with reason `disconnected` before the client tries to reconnect;
// - the client reconnects with exponential back-off and campaigns / observes again by itself;
// - a broker that a successor took over from (a rolling upgrade) tells its leaders `jeopardy`,
//   then sends `reconnect`: the client drops that connection itself at once (it does not wait
//   for the broker to close it) and connects again without back-off, then resumes, campaigns
//   and observes as after any disconnect;
// - events of one campaign or observation arrive in the broker's order;
// - fields and events this version does not know are ignored.

const net = require('node:net');
const { EventEmitter } = require('node:events');
const { performance } = require('node:perf_hooks');

const PROTOCOL_VERSION = 1;
const PROTOCOL_MINOR = 1;
const MAX_LINE_BYTES = 64 * 1024;
const DEFAULT_SOCKET_PATH = '/var/run/elector/elector.sock';

// --- errors ------------------------------------------------------------------------------

class ElectorError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}
/** The broker's socket cannot be reached (or it closed before greeting). */
class ConnectError extends ElectorError {}
/** The connection broke before the broker answered. */
class ConnectionLost extends ElectorError {}
/** The client was closed. */
class ClientClosed extends ElectorError {}
/** The broker sent something this client cannot understand. */
class ProtocolError extends ElectorError {}
/** The broker refused a request; `code` is the protocol's stable error code. */
class BrokerError extends ElectorError {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.brokerMessage = message;
  }
}

const ERROR_CODES = [
  'line_too_long', 'invalid_utf8', 'invalid_json', 'invalid_request', 'unknown_op',
  'invalid_election', 'invalid_namespace', 'invalid_identity', 'invalid_timing',
  'already_campaigning', 'not_campaigning', 'not_observing', 'identity_in_use',
  'too_many_campaigns', 'too_many_connections', 'forbidden_namespace', 'forbidden_identity',
  'unattested', 'timeout', 'too_many_errors', 'slow_consumer', 'shutting_down', 'internal',
  'api_forbidden', 'not_a_lock',
];

/** `invalid_election` -> `InvalidElectionError` (`timeout` -> `BrokerTimeoutError`). */
function errorClassName(code) {
  const camel = code.split('_').map((p) => p.charAt(0).toUpperCase() + p.slice(1)).join('');
  return (code === 'timeout' ? 'Broker' : '') + camel + 'Error';
}

const errors = {};
for (const code of ERROR_CODES) {
  const name = errorClassName(code);
  // A named class per code, so `instanceof InvalidElectionError` and `err.name` both work.
  const cls = {
    [name]: class extends BrokerError {
      constructor(message) {
        super(code, message);
        this.name = name;
      }
    },
  }[name];
  errors[name] = cls;
}

/** The error for a broker error code (a plain BrokerError for codes from newer brokers). */
function brokerError(code, message) {
  const cls = errors[errorClassName(String(code))];
  return cls ? new cls(message) : new BrokerError(String(code), message);
}

// --- the node's monotonic clock ----------------------------------------------------------

/**
 * CLOCK_MONOTONIC now, in nanoseconds (a BigInt): the clock `valid_until` is stated on.
 * `process.hrtime.bigint()` is libuv's `uv_hrtime()`, which on Linux reads
 * `clock_gettime(CLOCK_MONOTONIC)` (src/unix/linux.c, `uv__hrtime` with UV_CLOCK_PRECISE); the
 * greeting's `monotonic_now` checks it against the broker's reading at every connect.
 */
function monotonicNs() {
  return process.hrtime.bigint();
}

/** How far the broker's greeting may read behind our clock and still be the same clock (as
 * client-lib/src/clock.rs): a clock of another time namespace is off by far more. */
const SHARED_CLOCK_TOLERANCE_NS = 1000000000n;

/** Whether this process reads the broker's CLOCK_MONOTONIC (not so for a 1.0 broker). */
function sharesClock(hello) {
  if (!hello || hello.monotonicNow === null) return false;
  const diff = monotonicNs() - BigInt(hello.monotonicNow);
  return diff >= 0n && diff <= SHARED_CLOCK_TOLERANCE_NS;
}

/** A guarantee (CLOCK_MONOTONIC ns, a JSON number) as a deadline on `monotonicNs()`. Beyond
 * 2^53 ns (104 days of uptime) JSON numbers are rounded to a few ns: the deadline is taken a
 * microsecond early so that it never falls after the broker's. */
function deadlineOf(validUntil) {
  const ns = BigInt(Math.trunc(validUntil));
  return validUntil > Number.MAX_SAFE_INTEGER ? ns - 1000n : ns;
}

// --- parsing -----------------------------------------------------------------------------

const str = (v) => (typeof v === 'string' ? v : null);
const int = (v) => (Number.isInteger(v) ? v : null);
const nonneg = (v) => (Number.isInteger(v) && v >= 0 ? v : null);

/** A leader / elected / lost / renewed / jeopardy / safe event as a plain object, or null for
 * anything else. */
function parseElectionEvent(msg) {
  const election = str(msg.election);
  const namespace = str(msg.namespace);
  const lock = str(msg.lock) || 'lease';
  if (election === null || namespace === null) return null;
  if (msg.event === 'leader') {
    const e = { type: 'leader', election, namespace, lock, leader: str(msg.leader), term: int(msg.term), isMe: msg.is_me === true };
    if (str(msg.unknown) !== null) e.unknown = msg.unknown;
    return e;
  }
  const identity = str(msg.identity);
  const term = int(msg.term);
  if (identity === null || term === null) return null;
  if (msg.event === 'elected') {
    return { type: 'elected', election, namespace, lock, identity, term, validUntil: nonneg(msg.valid_until) };
  }
  if (msg.event === 'lost') {
    return { type: 'lost', election, namespace, lock, identity, term, reason: str(msg.reason) || 'unknown' };
  }
  const validUntil = nonneg(msg.valid_until);
  if ((msg.event === 'renewed' || msg.event === 'jeopardy' || msg.event === 'safe') && validUntil !== null) {
    return { type: msg.event, election, namespace, lock, identity, term, validUntil };
  }
  return null;
}

function parseHello(msg) {
  const caller = msg.caller && typeof msg.caller === 'object' ? msg.caller : null;
  return {
    protocol: int(msg.protocol) || 0,
    brokerVersion: String(msg.broker_version || ''),
    node: String(msg.node || ''),
    defaultNamespace: str(msg.default_namespace) || 'default',
    caller: caller ? { namespace: str(caller.namespace), pod: str(caller.pod) } : null,
    protocolMinor: int(msg.protocol_minor),
    monotonicNow: nonneg(msg.monotonic_now),
  };
}

function parseStatus(msg) {
  const items = (list) => (Array.isArray(list) ? list : []).filter((v) => v && typeof v === 'object').map((v) => ({
    election: String(v.election || ''),
    namespace: String(v.namespace || ''),
    lock: str(v.lock) || 'lease',
    identity: str(v.identity),
    leader: str(v.leader),
    term: int(v.term),
    isMe: v.is_me === true,
  }));
  return { campaigns: items(msg.campaigns), observations: items(msg.observations) };
}

// --- campaigns and observations ----------------------------------------------------------

const END = Symbol('end');

/** What campaigns and observations share: state, an event buffer, EventEmitter, async iterator. */
class Membership extends EventEmitter {
  constructor(client, role, election, namespace, lock, request) {
    super();
    this._client = client;
    this._role = role;
    this._request = request;
    this._accepted = false;
    this._leaving = false;
    this._buffer = [];
    this._waiters = [];
    this._emitQueue = [];
    this.election = election;
    this.namespace = namespace;
    this.lock = lock;
    /** Who leads, as last reported (null: nobody, or not known yet). */
    this.leader = null;
    this.term = null;
    this.closed = false;
    this._expiry = null;
  }

  get _key() {
    return `${this.namespace}\u0000${this.election}\u0000${this._role}`;
  }

  /** A broker event of this membership; `sharedClock`: the current broker's guarantees are on
   * this process's CLOCK_MONOTONIC (else they are ignored). */
  _apply(event, sharedClock) {
    const guarantee = (v) => (sharedClock ? v : null);
    if (event.type === 'leader') {
      this.leader = event.leader;
      this.term = event.term;
      this._deliver(event);
    } else if (event.type === 'elected') {
      this._cancelExpiry();
      this.isLeader = true;
      this.jeopardy = false;
      this.leader = event.identity;
      this.term = event.term;
      this.validUntil = guarantee(event.validUntil);
      this._deliver({ ...event, validUntil: this.validUntil });
    } else if (event.type === 'renewed') {
      if (this.isLeader && this.term === event.term) {
        this.validUntil = guarantee(event.validUntil);
        this._emitLater(['renewed', event]);
      }
    } else if (event.type === 'safe') {
      if (this.jeopardy && this.term === event.term) {
        this._cancelExpiry();
        this.jeopardy = false;
        this.validUntil = guarantee(event.validUntil);
        this._deliver(event);
      }
    } else if (event.type === 'jeopardy') {
      // The broker hands off without releasing: hold on to the guarantee it states.
      if (this.isLeader && this.term === event.term) this.validUntil = guarantee(event.validUntil);
      this._brokerGone('broker_shutdown');
    } else if (event.type === 'lost') {
      const wasLeader = this.isLeader;
      this._endLeadership();
      if (wasLeader) this._deliver(event);
    }
  }

  _deliver(event) {
    this._push(event);
    this._emitLater([event.type, event], ['event', event]);
  }

  _fields() {
    return { election: this.election, namespace: this.namespace, lock: this.lock, identity: this.identity || '', term: this.term ?? 0 };
  }

  /** The broker went away (or hands off): a leader with a guarantee left goes on in jeopardy
   * until it runs out; any other leader has lost, for `reason`. */
  _brokerGone(reason) {
    if (!this.isLeader) return;
    if (this.validUntil !== null && deadlineOf(this.validUntil) > monotonicNs()) {
      if (!this.jeopardy) {
        this.jeopardy = true;
        this._deliver({ type: 'jeopardy', ...this._fields(), validUntil: this.validUntil });
      }
      this._armExpiry();
      return;
    }
    const fields = this._fields();
    this._endLeadership();
    this._deliver({ type: 'lost', ...fields, reason });
  }

  _armExpiry() {
    this._cancelExpiry();
    const left = deadlineOf(this.validUntil) - monotonicNs();
    const ms = left <= 0n ? 0 : Math.min(Number((left + 999999n) / 1000000n), 0x7fffffff);
    this._expiry = setTimeout(() => this._expire(), ms);
  }

  _cancelExpiry() {
    if (this._expiry) clearTimeout(this._expiry);
    this._expiry = null;
  }

  /** At `valid_until` (never before: a timer that fires early is set again), a jeopardy that
   * nobody ended has lost. */
  _expire() {
    this._expiry = null;
    if (!this.jeopardy || this.validUntil === null) return;
    if (monotonicNs() < deadlineOf(this.validUntil)) {
      this._armExpiry();
      return;
    }
    const fields = this._fields();
    this._endLeadership();
    this._deliver({ type: 'lost', ...fields, reason: 'broker_unavailable' });
  }

  _endLeadership() {
    this._cancelExpiry();
    if (this._role === 'campaign') {
      this.isLeader = false;
      this.jeopardy = false;
      this.validUntil = null;
    }
  }

  /** What a leader in jeopardy asks of a (new) broker: `resume` with its claim; else null. */
  _resumeRequest() {
    if (this._role !== 'campaign' || !this.jeopardy || this.validUntil === null || this.term === null) return null;
    return { ...this._request, op: 'resume', term: this.term, valid_until: this.validUntil };
  }

  // Listeners are called on the next turn of the event loop, in order: so that listeners
  // attached right after `await client.campaign(...)` see the events that arrived with its reply.
  _emitLater(...emits) {
    this._emitQueue.push(...emits);
    if (this._emitQueue.length === emits.length) {
      setImmediate(() => {
        const queue = this._emitQueue;
        this._emitQueue = [];
        for (const args of queue) this.emit(...args);
      });
    }
  }

  _close() {
    if (this.closed) return;
    this.closed = true;
    this._endLeadership();
    this._push(END);
    this._emitLater(['end']);
  }

  _push(item) {
    const waiter = this._waiters.shift();
    if (waiter) waiter(item);
    else this._buffer.push(item);
  }

  /** The next event; null once closed (and every event read). Rejects after `timeoutMs`. */
  nextEvent(timeoutMs) {
    if (this._buffer.length > 0) {
      const item = this._buffer[0] === END ? END : this._buffer.shift();
      return Promise.resolve(item === END ? null : item);
    }
    return new Promise((resolve, reject) => {
      let timer = null;
      const waiter = (item) => {
        if (timer) clearTimeout(timer);
        if (item === END) this._buffer.push(END); // later reads end too
        resolve(item === END ? null : item);
      };
      this._waiters.push(waiter);
      if (timeoutMs !== undefined && timeoutMs !== null) {
        timer = setTimeout(() => {
          const i = this._waiters.indexOf(waiter);
          if (i >= 0) this._waiters.splice(i, 1);
          reject(new ElectorError(`no event within ${timeoutMs} ms`));
        }, timeoutMs);
      }
    });
  }

  /** Every event in order, until resigned / closed (then the iteration ends cleanly). */
  async *[Symbol.asyncIterator]() {
    for (;;) {
      const event = await this.nextEvent();
      if (event === null) return;
      yield event;
    }
  }
}

/** An observation of one election: `leader` events. */
class Observation extends Membership {
  /** Stops observing; the iteration ends. */
  async close() {
    await this._client._leave(this, { op: 'unobserve', election: this.election, namespace: this.namespace });
  }
}

/** A campaign in one election: `leader`, `elected`, `lost`, `jeopardy` and `safe` events. */
class Campaign extends Membership {
  constructor(...args) {
    super(...args);
    /** The holder identity the broker campaigns under. */
    this.identity = args[5].identity ?? null;
    /** True between `elected` and `lost`, a jeopardy included (false at once on a disconnect
     * without a guarantee). */
    this.isLeader = false;
    /** Leading without a broker, until `validUntil` at most (protocol 1.1). */
    this.jeopardy = false;
    /** This leader's guarantee (CLOCK_MONOTONIC ns, compare with `monotonicNs()`); null when
     * not leading, from a 1.0 broker, or when this process does not share the broker's clock. */
    this.validUntil = null;
  }

  /** Resolves with the term once this campaign leads. */
  waitElected(timeoutMs) {
    if (this.isLeader) return Promise.resolve(this.term ?? 0);
    if (this.closed) return Promise.reject(new ClientClosed('the campaign is closed'));
    return new Promise((resolve, reject) => {
      let timer = null;
      const done = () => {
        if (timer) clearTimeout(timer);
        this.off('elected', onElected);
        this.off('end', onEnd);
      };
      const onElected = (e) => { done(); resolve(e.term); };
      const onEnd = () => { done(); reject(new ClientClosed('the campaign was closed before it was elected')); };
      this.on('elected', onElected);
      this.on('end', onEnd);
      if (timeoutMs !== undefined && timeoutMs !== null) {
        timer = setTimeout(() => { done(); reject(new ElectorError(`not elected within ${timeoutMs} ms`)); }, timeoutMs);
      }
    });
  }

  /**
   * Waits until elected, then runs `work(signal)`; `signal` (an AbortSignal) is aborted the
   * moment leadership ends (lost, disconnect, resign, close; not by a jeopardy), with `signal.reason` a
   * `LeadershipLost` telling when and why. Resolves with what `work` resolves with.
   */
  async runWhileLeader(work) {
    const term = await this.waitElected();
    const controller = new AbortController();
    const stop = (event) => {
      if (controller.signal.aborted) return;
      controller.abort(new LeadershipLost(event && event.type === 'lost' ? event : null, performance.now()));
    };
    const onLost = (e) => stop(e);
    const onElected = (e) => { if (e.term !== term) stop(null); };
    const onEnd = () => stop(null);
    this.on('lost', onLost);
    this.on('elected', onElected);
    this.on('end', onEnd);
    if (!this.isLeader || this.term !== term) stop(null);
    try {
      return await work(controller.signal, term);
    } finally {
      this.off('lost', onLost);
      this.off('elected', onElected);
      this.off('end', onEnd);
    }
  }

  /** Gives up the campaign: a `lost` (resigned) event first if it led, then the iteration ends. */
  async resign() {
    await this._client._leave(this, { op: 'resign', election: this.election, namespace: this.namespace });
  }
}

/** Why protected work was stopped: `event` is the `lost` event (null on resign / close). */
class LeadershipLost extends ElectorError {
  constructor(event, lostAt) {
    super(`leadership lost (${event ? event.reason : 'closed'})`);
    this.event = event;
    /** `performance.now()` when leadership ended. */
    this.lostAt = lostAt;
  }
}

// --- the client --------------------------------------------------------------------------

/**
 * A connection to the broker, re-established with back-off whenever it breaks. Emits
 * `connected` (hello), `disconnected`, and `brokerError` (errors not tied to a request).
 */
class Client extends EventEmitter {
  constructor(options = {}) {
    super();
    if (typeof options === 'string') options = { socket: options };
    this.socketPath = options.socket || process.env.ELECTOR_SOCKET || DEFAULT_SOCKET_PATH;
    this.initialBackoffMs = options.initialBackoffMs ?? 50;
    this.maxBackoffMs = options.maxBackoffMs ?? 5000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this.hello = null;
    this._socket = null;
    this._closed = false;
    this._started = false;
    this._pending = new Map();
    this._memberships = new Map();
    this._nextId = 1;
    this._sharedClock = false;
    this._backoff = this.initialBackoffMs;
    this._reconnectTimer = null;
    this._connectedWaiters = [];
  }

  /** Connects to `socket` (a path or options) and resolves once greeted. */
  static async connect(options) {
    const client = new Client(options);
    await client.connect();
    return client;
  }

  /** Connects and reads the greeting; rejects (ConnectError or the broker's error) if the
   * broker cannot be reached now. Later disconnects are retried in the background. */
  async connect() {
    if (this._started) return this;
    await this._dial();
    this._started = true;
    return this;
  }

  get connected() {
    return !this._closed && this.hello !== null;
  }

  /** Closes the connection (the broker resigns its campaigns at once); every iteration ends. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._reconnectTimer);
    this.hello = null;
    if (this._socket) this._socket.destroy();
    this._socket = null;
    this._failPending(new ClientClosed('the client was closed'));
    for (const w of this._connectedWaiters.splice(0)) w.reject(new ClientClosed('the client was closed'));
    for (const m of this._memberships.values()) m._close();
    this._memberships.clear();
  }

  _namespace(namespace) {
    return namespace ?? (this.hello ? this.hello.defaultNamespace : 'default');
  }

  /** Becomes a candidate; resolves once the broker accepted (rejects with its error). */
  async campaign(election, options = {}) {
    await this._waitConnected();
    const namespace = this._namespace(options.namespace);
    const lock = options.lock || 'lease';
    const request = { op: 'campaign', election, namespace, lock };
    if (options.identity !== undefined && options.identity !== null) request.identity = options.identity;
    if (options.timing) request.timing = timingToWire(options.timing);
    if (options.priority !== undefined && options.priority !== null) request.priority = options.priority;
    const m = new Campaign(this, 'campaign', election, namespace, lock, request);
    const reply = await this._join(m);
    if (typeof reply.identity === 'string') m.identity = reply.identity;
    return m;
  }

  /** Watches an election without taking part. */
  async observe(election, options = {}) {
    await this._waitConnected();
    const namespace = this._namespace(options.namespace);
    const lock = options.lock || 'lease';
    const m = new Observation(this, 'observe', election, namespace, lock, { op: 'observe', election, namespace, lock });
    await this._join(m);
    return m;
  }

  /** This connection's campaigns and observations as the broker sees them. */
  async status() {
    return parseStatus(await this._request({ op: 'status' }));
  }

  async ping() {
    await this._request({ op: 'ping' });
  }

  // --- internals -------------------------------------------------------------------------

  async _join(m) {
    if (this._memberships.has(m._key)) {
      throw new errors.AlreadyCampaigningError(`this client already has a ${m._role} in ${m.namespace}/${m.election}`);
    }
    // Registered before the request goes out: events may come before the ok.
    this._memberships.set(m._key, m);
    try {
      const reply = await this._request({ ...m._request });
      m._accepted = true;
      return reply;
    } catch (e) {
      if (this._memberships.get(m._key) === m) this._memberships.delete(m._key);
      m._close();
      throw e;
    }
  }

  async _leave(m, request) {
    if (m.closed) return;
    m._leaving = true;
    try {
      // Disconnected: the broker already dropped it with the connection, and it is not made
      // again on reconnect.
      if (this.connected) await this._request(request);
    } catch (e) {
      if (!(e instanceof ConnectionLost)) throw e;
    } finally {
      if (this._memberships.get(m._key) === m) this._memberships.delete(m._key);
      m._close();
    }
  }

  _waitConnected() {
    if (this._closed) return Promise.reject(new ClientClosed('the client was closed'));
    if (!this._started) return Promise.reject(new ClientClosed('the client is not connected: call connect() first'));
    if (this.hello) return Promise.resolve();
    return new Promise((resolve, reject) => this._connectedWaiters.push({ resolve, reject }));
  }

  async _request(request) {
    await this._waitConnected();
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject });
      this._socket.write(JSON.stringify({ ...request, id }) + '\n');
    });
  }

  _failPending(error) {
    const pending = this._pending;
    this._pending = new Map();
    for (const p of pending.values()) p.reject(error);
  }

  _dial() {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection(this.socketPath);
      let greeted = false;
      let chunks = [];
      let size = 0;
      let discarding = false;
      const timer = setTimeout(() => fail(new ConnectError(`no greeting from ${this.socketPath} within ${this.connectTimeoutMs} ms`)), this.connectTimeoutMs);
      const fail = (error) => {
        clearTimeout(timer);
        socket.destroy();
        reject(error);
      };
      const onMessage = (msg) => {
        if (greeted) {
          // Lines after a `reconnect` (the connection is dropped) are not read.
          if (this._socket === socket) this._dispatch(msg);
          return;
        }
        clearTimeout(timer);
        if (msg.event === 'error') return fail(brokerError(msg.code, String(msg.message || '')));
        if (msg.event !== 'hello') return fail(new ProtocolError(`expected a greeting, got ${JSON.stringify(msg)}`));
        greeted = true;
        if (this._closed) {
          socket.destroy();
          return reject(new ClientClosed('the client was closed'));
        }
        this._socket = socket;
        this.hello = parseHello(msg);
        this._sharedClock = sharesClock(this.hello);
        this._backoff = this.initialBackoffMs;
        this._remake();
        for (const w of this._connectedWaiters.splice(0)) w.resolve();
        this.emit('connected', this.hello);
        resolve();
      };
      const onLine = (buf) => {
        let msg;
        try {
          msg = JSON.parse(buf.toString('utf8'));
        } catch {
          return;
        }
        if (msg && typeof msg === 'object' && !Array.isArray(msg) && typeof msg.event === 'string') onMessage(msg);
      };
      socket.on('data', (data) => {
        let start = 0;
        for (let i = data.indexOf(10); i !== -1; i = data.indexOf(10, start)) {
          const piece = data.subarray(start, i);
          start = i + 1;
          if (discarding) {
            discarding = false;
            continue;
          }
          const line = size === 0 ? piece : Buffer.concat([...chunks, piece]);
          chunks = [];
          size = 0;
          if (line.length <= MAX_LINE_BYTES) onLine(line);
        }
        const rest = data.subarray(start);
        if (rest.length === 0 || discarding) return;
        size += rest.length;
        if (size > MAX_LINE_BYTES) {
          chunks = [];
          size = 0;
          discarding = true; // skip the rest of an overlong line
        } else {
          chunks.push(Buffer.from(rest));
        }
      });
      socket.on('error', (e) => {
        if (!greeted) fail(new ConnectError(`cannot reach the broker at ${this.socketPath}: ${e.message}`));
      });
      socket.on('close', () => {
        if (!greeted) return fail(new ConnectError(`the broker at ${this.socketPath} closed before greeting`));
        if (this._socket === socket) this._disconnected();
      });
    });
  }

  /** The connection ended; `atOnce`: reconnect without back-off (a broker's `reconnect`). */
  _disconnected(atOnce = false) {
    this._socket = null;
    this.hello = null;
    this._failPending(new ConnectionLost('the connection to the broker was lost'));
    for (const m of this._memberships.values()) m._brokerGone('disconnected');
    if (this._closed) return;
    this.emit('disconnected');
    this._scheduleReconnect(atOnce);
  }

  /** A successor broker serves the socket now (a rolling upgrade): move there at once rather
   * than wait for this broker to close the connection. */
  _moveToSuccessor() {
    const socket = this._socket;
    this._disconnected(true);
    if (socket) socket.destroy();
  }

  /** The next attempt to connect: after the back-off delay (which then doubles), or at once
   * (the first attempt after a `reconnect`; a failed one backs off as usual). */
  _scheduleReconnect(atOnce = false) {
    let delay = 0;
    if (!atOnce) {
      delay = this._backoff;
      this._backoff = Math.min(this._backoff * 2, this.maxBackoffMs);
    }
    this._reconnectTimer = setTimeout(() => {
      if (this._closed) return;
      this._dial().catch(() => this._scheduleReconnect());
    }, delay);
  }

  /** On a new connection: leaders in jeopardy resume, the others campaign and observe again. */
  _remake() {
    for (const m of this._memberships.values()) {
      if (!m._accepted || m._leaving) continue;
      const resume = m._resumeRequest();
      this._resend(m, resume || m._request, resume !== null);
    }
  }

  _resend(m, request, resume) {
    const id = this._nextId++;
    this._pending.set(id, {
      resolve: () => {},
      reject: (e) => {
        if (!(e instanceof BrokerError)) return;
        if (resume && !m.closed && !m._leaving && this.connected) {
          // A broker that cannot resume (protocol 1.0: unknown_op): campaign.
          this._resend(m, m._request, false);
        } else {
          this.emit('brokerError', e);
        }
      },
    });
    this._socket.write(JSON.stringify({ ...request, id }) + '\n');
  }

  _dispatch(msg) {
    const kind = msg.event;
    if ((kind === 'ok' || kind === 'status' || kind === 'pong' || kind === 'error') && this._pending.has(msg.id)) {
      const p = this._pending.get(msg.id);
      this._pending.delete(msg.id);
      if (kind === 'error') p.reject(brokerError(msg.code, String(msg.message || '')));
      else p.resolve(msg);
      return;
    }
    if (kind === 'error') {
      this.emit('brokerError', brokerError(msg.code, String(msg.message || '')));
      return;
    }
    if (kind === 'reconnect') {
      this._moveToSuccessor();
      return;
    }
    const event = parseElectionEvent(msg);
    if (event === null) return; // hello, unknown events, stale replies
    const roles = event.type === 'leader' ? ['campaign', 'observe'] : ['campaign'];
    for (const role of roles) {
      const m = this._memberships.get(`${event.namespace}\u0000${event.election}\u0000${role}`);
      if (m && !m.closed) m._apply(event, this._sharedClock);
    }
  }
}

function timingToWire(t) {
  const out = {};
  if (t.leaseDuration !== undefined) out.lease_duration = t.leaseDuration;
  if (t.renewDeadline !== undefined) out.renew_deadline = t.renewDeadline;
  if (t.retryPeriod !== undefined) out.retry_period = t.retryPeriod;
  return out;
}

/** Connects to the broker (a socket path or options). */
function connect(options) {
  return Client.connect(options);
}

module.exports = {
  PROTOCOL_VERSION,
  PROTOCOL_MINOR,
  MAX_LINE_BYTES,
  DEFAULT_SOCKET_PATH,
  ERROR_CODES,
  Client,
  Campaign,
  Observation,
  connect,
  monotonicNs,
  ElectorError,
  ConnectError,
  ConnectionLost,
  ClientClosed,
  ProtocolError,
  BrokerError,
  LeadershipLost,
  brokerError,
  errorClassName,
  ...errors,
};
