'use strict';
// Runs a real `electord --standalone` for the tests. The binary comes from $ELECTORD (the Rust
// test tests/tests/clients.rs builds it and sets it); tests that need it fail without it.
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

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function greets(socketPath) {
  return new Promise((resolve) => {
    const s = net.createConnection(socketPath);
    s.once('data', (d) => { s.destroy(); resolve(d.toString().startsWith('{"event":"hello"')); });
    s.once('error', () => resolve(false));
  });
}

/** One standalone broker process on a socket of its own (fast timing: lease 2 s). */
class Electord {
  constructor() {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'elector-node-'));
    this.socketPath = path.join(this.dir, 'elector.sock');
    this.process = null;
  }

  async start() {
    const bin = electordBinary();
    this.process = spawn(bin, [
      '--standalone', '--socket', this.socketPath, '--http-addr', '',
      '--lease-duration', '2', '--renew-deadline', '1.5', '--retry-period', '0.25',
      '--shutdown-grace', '1', '--log', 'error',
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

module.exports = { Electord, sleep };
