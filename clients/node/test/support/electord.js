'use strict';
// Runs a real `electord` for the tests: `--standalone` (locks in its memory), or on the test
// Kubernetes API server whose kubeconfig is $ELECTOR_KUBECONFIG (locks outlive the broker, so a
// restarted broker can resume its leaders). The binary comes from $ELECTORD. Both are set by the
// Rust test tests/tests/clients.rs; tests that need them fail without them.
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

function electordBinary() {
  const bin = process.env.ELECTORD;
  if (!bin || !fs.existsSync(bin)) {
    throw new Error('set ELECTORD to the electord binary (cargo build -p elector-broker --bin electord); tests/tests/clients.rs does this');
  }
  return bin;
}

function testKubeconfig() {
  const file = process.env.ELECTOR_KUBECONFIG;
  if (!file || !fs.existsSync(file)) {
    throw new Error('set ELECTOR_KUBECONFIG to a kubeconfig of the test API server (cargo run -p elector-tests --bin test-apiserver); tests/tests/clients.rs does this');
  }
  return file;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function greets(socketPath) {
  return new Promise((resolve) => {
    const s = net.createConnection(socketPath);
    s.once('data', (d) => { s.destroy(); resolve(d.toString().startsWith('{"event":"hello"')); });
    s.once('error', () => resolve(false));
  });
}

/** One broker process on a socket of its own (fast timing: lease 2 s): standalone, or on the
 * API server of `options.kubeconfig` as node `options.node`. With `options.takeover`, the
 * socket `options.socketPath` is another broker's, still running (a rolling upgrade). */
class Electord {
  constructor(options = {}) {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'elector-node-'));
    this.socketPath = options.socketPath ?? path.join(this.dir, 'elector.sock');
    this.kubeconfig = options.kubeconfig ?? null;
    this.node = options.node ?? 'node-a';
    this.takeover = options.takeover ?? false;
    this.process = null;
  }

  async start() {
    const bin = electordBinary();
    const where = this.kubeconfig
      ? ['--kubeconfig', this.kubeconfig, '--node-name', this.node, '--attest=none']
      : ['--standalone'];
    this.process = spawn(bin, [
      ...where, '--socket', this.socketPath, '--http-addr', '',
      '--lease-duration', '2', '--renew-deadline', '1.5', '--retry-period', '0.25',
      '--shutdown-grace', '1', '--log', 'error', ...(this.takeover ? ['--takeover'] : []),
    ], { stdio: ['ignore', 'inherit', 'inherit'] });
    let exited = null;
    this.process.once('exit', (code) => { exited = code; });
    const deadline = Date.now() + 20000;
    while (Date.now() < deadline) {
      if (exited !== null) throw new Error(`electord exited with ${exited}`);
      if (await greets(this.socketPath)) return this;
      await sleep(20);
    }
    throw new Error('electord did not start listening within 20 s');
  }

  /** Like a crash: no clean shutdown, connections just close. */
  async kill() {
    const p = this.process;
    this.process = null;
    if (p && p.exitCode === null && p.signalCode === null) {
      const exited = new Promise((r) => p.once('exit', r));
      p.kill('SIGKILL');
      await exited;
    }
  }

  async stop() {
    await this.kill();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

module.exports = { Electord, sleep, testKubeconfig };
