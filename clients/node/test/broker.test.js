'use strict';
// The Node.js client against a real `electord --standalone` process ($ELECTORD).
const test = require('node:test');
const assert = require('node:assert');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { isDeepStrictEqual } = require('node:util');
const { performance } = require('node:perf_hooks');
const elector = require('elector-client');
const { Electord, sleep, testKubeconfig } = require('./support/electord.js');

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
async function setup(t, options) {
  const broker = await new Electord(options).start();
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

test("process.hrtime.bigint() reads electord's CLOCK_MONOTONIC", BOUNDED, async (t) => {
  const { broker } = await setup(t);
  const before = elector.monotonicNs();
  const c = await Client.connect({ socket: broker.socketPath });
  const after = elector.monotonicNs();
  t.after(() => c.close());
  assert.strictEqual(c.hello.protocolMinor, 1);
  // electord reads clock_gettime(CLOCK_MONOTONIC) as it greets, between our two readings.
  const theirs = BigInt(c.hello.monotonicNow);
  assert.ok(before <= theirs + 1000n && theirs <= after + 1000n, `${before} <= ${theirs} <= ${after}`);
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
  const elected = await nextOf(campaign, 'elected');
  assert.ok(elected.validUntil !== null, "electord's clock is this process's");
  await broker.kill();
  // A leader with a guarantee rides out the disconnect in jeopardy...
  const jeopardy = await nextOf(campaign, 'jeopardy');
  assert.strictEqual(jeopardy.term, elected.term);
  // ...but a standalone broker keeps its locks in memory: restarted, it cannot confirm the
  // leadership (lost, preempted), or the guarantee runs out first (broker_unavailable).
  await broker.start();
  const lost = await nextOf(campaign, 'lost');
  assert.ok(['preempted', 'broker_unavailable'].includes(lost.reason), lost.reason);
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
  // The broker's lost (resigned) comes before its ok: wait for the ok before the client closes.
  let resigned = null;
  setTimeout(() => { resigned = campaign.resign(); }, 300);
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
  await resigned;
  const why = signalSeen.reason;
  assert.ok(why instanceof elector.LeadershipLost);
  assert.strictEqual(why.event.reason, 'resigned');
  assert.ok(stoppedAt - why.lostAt < 100, `stopped ${stoppedAt - why.lostAt} ms after lost`);
});

test('runWhileLeader: the work goes on through a jeopardy and stops when its guarantee runs out', BOUNDED, async (t) => {
  const { broker, client } = await setup(t);
  const c = await client();
  const campaign = await c.campaign('report-job', { identity: 'pod-a' });
  const { reason, jeopardy, abortedInJeopardy, abortedAt } = await campaign.runWhileLeader(async (signal) => {
    await broker.kill();
    const j = await nextOf(campaign, 'jeopardy');
    const early = signal.aborted;
    let at = null;
    if (!signal.aborted) {
      await new Promise((resolve) => signal.addEventListener('abort', () => { at = elector.monotonicNs(); resolve(); }, { once: true }));
    }
    return { reason: signal.reason, jeopardy: j, abortedInJeopardy: early, abortedAt: at };
  });
  assert.ok(!abortedInJeopardy, 'a jeopardy does not end leadership');
  assert.strictEqual(reason.event.reason, 'broker_unavailable');
  assert.strictEqual(reason.event.term, jeopardy.term);
  // The guarantee is on CLOCK_MONOTONIC, like monotonicNs(): the work was not stopped before it.
  assert.ok(abortedAt >= BigInt(jeopardy.validUntil), `stopped ${Number(BigInt(jeopardy.validUntil) - abortedAt) / 1e6} ms early`);
  assert.ok(!campaign.isLeader);
});

test('a broker killed and restarted within the deadline costs no leadership (test API server)', BOUNDED, async (t) => {
  const { broker, client } = await setup(t, { kubeconfig: testKubeconfig() });
  const c = await client();
  // A renew deadline with room for a broker restart on a loaded CI machine.
  const timing = { leaseDuration: 12, renewDeadline: 8, retryPeriod: 1 };
  const campaign = await c.campaign('survival-node', { identity: 'pod-a', timing });
  const elected = await nextOf(campaign, 'elected');
  assert.ok(elected.validUntil !== null, "electord's clock (CLOCK_MONOTONIC) is process.hrtime's");
  assert.ok(BigInt(elected.validUntil) > elector.monotonicNs());
  const outcome = await campaign.runWhileLeader(async (signal, term) => {
    await broker.kill(); // SIGKILL: nothing released
    const jeopardy = await nextOf(campaign, 'jeopardy');
    assert.strictEqual(jeopardy.term, term);
    assert.ok(campaign.isLeader && campaign.jeopardy);
    await broker.start(); // the same socket path
    const seen = [];
    for (;;) {
      const e = await campaign.nextEvent(WAIT_MS);
      assert.ok(e !== null, 'the campaign ended');
      assert.ok(e.type !== 'lost' && e.type !== 'elected', `leadership changed: ${JSON.stringify([...seen, e])}`);
      seen.push(e);
      if (e.type === 'safe') {
        assert.ok(elector.monotonicNs() < BigInt(jeopardy.validUntil), 'safe came before the guarantee ran out');
        return { safe: e, aborted: signal.aborted };
      }
    }
  });
  assert.ok(!outcome.aborted, 'the leader-only work ran on throughout');
  assert.strictEqual(outcome.safe.term, elected.term, 'same term');
  assert.ok(BigInt(outcome.safe.validUntil) > elector.monotonicNs(), 'a fresh guarantee');
  assert.ok(campaign.isLeader && !campaign.jeopardy);
  assert.strictEqual(campaign.term, elected.term);
  // The broker's view (status, leader events) follows its safe: wait for it, bounded.
  const deadline = Date.now() + WAIT_MS;
  let seenByBroker;
  for (;;) {
    seenByBroker = (await c.status()).campaigns.map((s) => [s.identity, s.isMe, s.term]);
    if (isDeepStrictEqual(seenByBroker, [['pod-a', true, elected.term]]) || Date.now() > deadline) break;
    await sleep(50);
  }
  assert.deepStrictEqual(seenByBroker, [['pod-a', true, elected.term]]);
  assert.ok(campaign.isLeader && !campaign.jeopardy);
});

test('a rolling upgrade moves the leader to the successor without back-off (test API server)', BOUNDED, async (t) => {
  const { broker } = await setup(t, { kubeconfig: testKubeconfig() });
  // A back-off far beyond the guarantee: only a client that reconnects at once on the old
  // broker's `reconnect` resumes in time; one that waited for the close and backed off would
  // lose at validUntil.
  const c = await Client.connect({ socket: broker.socketPath, initialBackoffMs: 120000, maxBackoffMs: 120000 });
  t.after(() => c.close());
  const timing = { leaseDuration: 12, renewDeadline: 8, retryPeriod: 1 };
  const campaign = await c.campaign('upgrade-node', { identity: 'pod-a', timing });
  const elected = await nextOf(campaign, 'elected');
  assert.ok(elected.validUntil !== null, "electord's clock (CLOCK_MONOTONIC) is process.hrtime's");
  const outcome = await campaign.runWhileLeader(async (signal) => {
    const successor = new Electord({ socketPath: broker.socketPath, kubeconfig: testKubeconfig(), takeover: true });
    t.after(() => successor.stop());
    await successor.start(); // the old broker tells jeopardy, then reconnect
    const seen = [];
    for (;;) {
      const e = await campaign.nextEvent(WAIT_MS);
      assert.ok(e !== null, 'the campaign ended');
      assert.ok(e.type !== 'lost' && e.type !== 'elected', `leadership changed: ${JSON.stringify([...seen, e])}`);
      seen.push(e);
      if (e.type === 'safe') return { seen, aborted: signal.aborted };
    }
  });
  const moves = outcome.seen.filter((e) => e.type !== 'leader').map((e) => [e.type, e.term]);
  assert.deepStrictEqual(moves, [['jeopardy', elected.term], ['safe', elected.term]], JSON.stringify(outcome.seen));
  assert.ok(!outcome.aborted, 'the leader-only work ran on throughout');
  assert.ok(campaign.isLeader && !campaign.jeopardy);
  // The successor serves this client; its view (status) follows its safe: wait for it, bounded.
  const deadline = Date.now() + WAIT_MS;
  let seenByBroker;
  for (;;) {
    seenByBroker = (await c.status()).campaigns.map((s) => [s.identity, s.isMe, s.term]);
    if (isDeepStrictEqual(seenByBroker, [['pod-a', true, elected.term]]) || Date.now() > deadline) break;
    await sleep(50);
  }
  assert.deepStrictEqual(seenByBroker, [['pod-a', true, elected.term]]);
});
