'use strict';
// The Node.js client against a real `electord --standalone` process ($ELECTORD).
const test = require('node:test');
const assert = require('node:assert');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { performance } = require('node:perf_hooks');
const elector = require('elector-client');
const { Electord, sleep } = require('./support/electord.js');

const { Client, ConnectError, InvalidElectionError, InvalidTimingError, IdentityInUseError, BrokerError } = elector;
const WAIT_MS = 20000; // generous: the CI machine is a loaded 2-core VM
const BOUNDED = { timeout: 120000 }; // no test may hang the suite

/** The next event of `type` (others are skipped). */
async function nextOf(handle, type, predicate = () => true) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const e = await handle.nextEvent(Math.max(1, deadline - Date.now()));
    if (e === null) throw new Error(`events ended before a ${type}`);
    if (e.type === type && predicate(e)) return e;
  }
}

/** A broker and clients for one test, all stopped after it. */
async function setup(t) {
  const broker = await new Electord().start();
  const clients = [];
  t.after(async () => {
    for (const c of clients) c.close();
    await broker.stop();
  });
  const client = async () => {
    const c = await Client.connect({ socket: broker.socketPath });
    clients.push(c);
    return c;
  };
  return { broker, client };
}

test('ESM and CommonJS entry points are the same module', BOUNDED, async () => {
  const esm = await import('elector-client');
  assert.strictEqual(esm.Client, elector.Client);
  assert.strictEqual(esm.default.InvalidElectionError, elector.InvalidElectionError);
});

test('campaign: elected, then lost on resign, then the iteration ends', BOUNDED, async (t) => {
  const { client } = await setup(t);
  const c = await client();
  const campaign = await c.campaign('report-job', { identity: 'pod-a' });
  assert.strictEqual(campaign.identity, 'pod-a');
  assert.strictEqual(campaign.namespace, 'default');
  const emitted = [];
  campaign.on('event', (e) => emitted.push(e.type));
  const elected = await nextOf(campaign, 'elected');
  assert.strictEqual(elected.identity, 'pod-a');
  assert.ok(campaign.isLeader);
  assert.strictEqual(await campaign.waitElected(1000), elected.term);
  await campaign.resign();
  const lost = await nextOf(campaign, 'lost');
  assert.deepStrictEqual([lost.reason, lost.term], ['resigned', elected.term]);
  assert.ok(!campaign.isLeader);
  assert.strictEqual(await campaign.nextEvent(WAIT_MS), null);
  const rest = [];
  for await (const e of campaign) rest.push(e);
  assert.deepStrictEqual(rest, []);
  await new Promise((r) => setImmediate(r)); // listeners are called on the next turn
  assert.ok(emitted.includes('elected') && emitted.includes('lost'), `EventEmitter saw ${emitted}`);
});

test('observe: every leader change, with a growing term', BOUNDED, async (t) => {
  const { client } = await setup(t);
  const watcher = await client();
  const observation = await watcher.observe('report-job');
  const a = await (await client()).campaign('report-job', { identity: 'pod-a' });
  await nextOf(a, 'elected');
  const first = await nextOf(observation, 'leader', (e) => e.leader === 'pod-a');
  assert.strictEqual(first.isMe, false);
  const b = await (await client()).campaign('report-job', { identity: 'pod-b' });
  await a.resign();
  await nextOf(b, 'elected');
  const second = await nextOf(observation, 'leader', (e) => e.leader === 'pod-b');
  assert.ok(second.term > first.term, `${second.term} > ${first.term}`);
  const status = await watcher.status();
  assert.deepStrictEqual(status.observations.map((o) => o.election), ['report-job']);
  await observation.close();
  for await (const e of observation) assert.strictEqual(e.type, 'leader');
});

test('errors are exceptions named after the protocol codes', BOUNDED, async (t) => {
  const { broker, client } = await setup(t);
  const c = await client();
  await assert.rejects(c.campaign('Bad_Name', { identity: 'pod-a' }), (e) => e instanceof InvalidElectionError && e.code === 'invalid_election');
  await assert.rejects(
    c.campaign('report-job', { identity: 'pod-a', timing: { leaseDuration: 2, renewDeadline: 3 } }),
    InvalidTimingError,
  );
  await c.campaign('report-job', { identity: 'pod-a' });
  await assert.rejects((await client()).campaign('report-job', { identity: 'pod-a' }), IdentityInUseError);
  await assert.rejects((await client()).campaign('a'.repeat(300), { identity: 'pod-a' }), BrokerError);
  await c.ping(); // still usable after errors
  await assert.rejects(Client.connect({ socket: broker.socketPath + '.missing' }), ConnectError);
});

test('the async iterator ends cleanly on close', BOUNDED, async (t) => {
  const { broker } = await setup(t);
  const c = await Client.connect({ socket: broker.socketPath });
  const campaign = await c.campaign('report-job', { identity: 'pod-a' });
  const seen = [];
  const consumed = (async () => {
    for await (const e of campaign) seen.push(e.type);
  })();
  await campaign.waitElected(WAIT_MS);
  let ended = false;
  campaign.on('end', () => { ended = true; });
  c.close();
  await consumed;
  await new Promise((r) => setImmediate(r)); // listeners are called on the next turn
  assert.ok(ended, 'the end event was emitted');
  assert.ok(seen.includes('elected'), `${seen}`);
});

test('reconnects after a broker restart and campaigns again by itself', BOUNDED, async (t) => {
  const { broker, client } = await setup(t);
  const c = await client();
  const campaign = await c.campaign('report-job', { identity: 'pod-a' });
  await nextOf(campaign, 'elected');
  await broker.kill();
  const lost = await nextOf(campaign, 'lost');
  assert.strictEqual(lost.reason, 'disconnected');
  assert.ok(!campaign.isLeader);
  await broker.start();
  const again = await nextOf(campaign, 'elected');
  assert.strictEqual(again.identity, 'pod-a');
  assert.ok(c.connected);
  assert.deepStrictEqual((await c.status()).campaigns.map((s) => s.identity), ['pod-a']);
});

test('failover between two client processes', BOUNDED, async (t) => {
  const { broker } = await setup(t);
  const candidate = path.join(__dirname, 'support', 'candidate.js');
  const procs = [];
  t.after(() => { for (const p of procs) p.kill('SIGKILL'); });
  const spawnCandidate = (identity) => {
    const p = spawn(process.execPath, [candidate, broker.socketPath, 'failover', identity], { stdio: ['ignore', 'pipe', 'inherit'] });
    procs.push(p);
    let buf = '';
    const lines = [];
    const waiters = [];
    p.stdout.on('data', (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) !== -1) {
        lines.push(buf.slice(0, i));
        buf = buf.slice(i + 1);
        for (const w of waiters.splice(0)) w();
      }
    });
    p.waitLine = async (prefix) => {
      const deadline = Date.now() + WAIT_MS;
      for (;;) {
        const hit = lines.find((l) => l.startsWith(prefix));
        if (hit) return hit;
        if (Date.now() > deadline) throw new Error(`${prefix} not printed; saw ${lines}`);
        await Promise.race([new Promise((r) => waiters.push(r)), sleep(100)]);
      }
    };
    return p;
  };
  const a = spawnCandidate('pod-a');
  const first = Number((await a.waitLine('elected')).split(' ')[1]);
  const b = spawnCandidate('pod-b');
  await b.waitLine('leader pod-a');
  a.kill('SIGKILL');
  const second = Number((await b.waitLine('elected')).split(' ')[1]);
  assert.ok(second > first, `${second} > ${first}`);
});

test('runWhileLeader stops the work within 100 ms of lost', BOUNDED, async (t) => {
  const { client } = await setup(t);
  const c = await client();
  const campaign = await c.campaign('report-job', { identity: 'pod-a' });
  setTimeout(() => campaign.resign(), 300);
  let stoppedAt = null;
  let signalSeen = null;
  const result = await campaign.runWhileLeader(async (signal, term) => {
    assert.strictEqual(term, campaign.term);
    signalSeen = signal;
    while (!signal.aborted) await sleep(5);
    stoppedAt = performance.now();
    return 'done';
  });
  assert.strictEqual(result, 'done');
  const why = signalSeen.reason;
  assert.ok(why instanceof elector.LeadershipLost);
  assert.strictEqual(why.event.reason, 'resigned');
  assert.ok(stoppedAt - why.lostAt < 100, `stopped ${stoppedAt - why.lostAt} ms after lost`);
});

test('runWhileLeader: a disconnect aborts the work', BOUNDED, async (t) => {
  const { broker, client } = await setup(t);
  const c = await client();
  const campaign = await c.campaign('report-job', { identity: 'pod-a' });
  const reason = await campaign.runWhileLeader(async (signal) => {
    await broker.kill();
    if (!signal.aborted) await new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }));
    return signal.reason;
  });
  assert.strictEqual(reason.event.reason, 'disconnected');
});
