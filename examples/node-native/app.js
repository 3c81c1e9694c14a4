// The example app from the 2016 Kubernetes blog post "Simple leader election with Kubernetes
// and Docker", ported to elector-client: instead of polling a leader-elector sidecar on :4040
// every 5 seconds, it campaigns through the node's elector broker itself and is pushed every
// change of master at once, with the term (a fencing token that only grows). It serves
// "Master is <name>, term <term>" on port 8080 ($PORT).
var http = require('http');
var os = require('os');
var elector = require('elector-client');

var election = process.env.ELECTION || 'example';
var identity = process.env.POD_NAME || os.hostname();
var port = Number(process.env.PORT || 8080);

// This will hold info about the current master: pushed by the broker, never stale by more
// than a disconnect (then it is cleared until the broker answers again). A master whose broker
// restarts stays the master while in jeopardy: until its guarantee runs out at most, and it is
// told "safe" once the restarted broker confirms it.
var master = {};
var campaign = null;

  // The web handler for our nodejs application
  var handleRequest = function(request, response) {
    response.writeHead(200);
    response.end("Master is " + (master.name || "unknown") + ", term " + master.term);
  };

  var main = async function() {
    // $ELECTOR_SOCKET, or the broker's default /var/run/elector/elector.sock
    var client = await elector.Client.connect();
    client.on('disconnected', function() {
      if (campaign && campaign.isLeader) return; // in jeopardy: still the master for now
      master = {};
      console.log('broker unreachable: master unknown');
    });
    campaign = await client.campaign(election, { identity: identity });
    campaign.on('leader', function(e) {
      master = { name: e.leader, term: e.term };
      console.log('master ' + (e.leader || '-') + ' term ' + e.term);
    });
    campaign.on('elected', function(e) { console.log('elected: ' + identity + ' is the master, term ' + e.term); });
    campaign.on('lost', function(e) {
      console.log('lost: ' + e.reason + ', term ' + e.term);
      if (!client.connected) master = {};
    });
    campaign.on('jeopardy', function(e) { console.log('jeopardy: the broker went away; still the master, term ' + e.term); });
    campaign.on('safe', function(e) { console.log('safe: the broker confirmed ' + identity + ' as the master, term ' + e.term); });

    // set up the web server
    var www = http.createServer(handleRequest);
    www.listen(port, function() { console.log('serving on port ' + www.address().port); });
  };

  main().catch(function(e) { console.error('problem with the broker: ' + e.message); process.exit(1); });
