'use strict';
// A separate client process for the failover test: campaigns and prints each event as a line,
// until killed. Usage: candidate.js SOCKET ELECTION IDENTITY
const { Client } = require('elector-client');

async function main() {
  const [socket, election, identity] = process.argv.slice(2);
  const client = await Client.connect({ socket });
  const campaign = await client.campaign(election, { identity });
  for await (const e of campaign) {
    if (e.type === 'elected') console.log(`elected ${e.term}`);
    else if (e.type === 'lost') console.log(`lost ${e.term} ${e.reason}`);
    else console.log(`leader ${e.leader} ${e.term}`);
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
