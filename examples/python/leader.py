#!/usr/bin/env python3
"""Leader election from Python through the elector broker, standard library only.

Campaigns in an election, prints every event, and "works" only while it leads. Reconnects
with back-off if the broker restarts (and is not leader meanwhile).

    python3 examples/python/leader.py --socket /tmp/elector.sock --election report-job --id pod-a
"""
import argparse
import json
import os
import socket
import sys
import time


def events(sock):
    """Yields each JSON event line from the broker."""
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)


def campaign(path, election, identity, namespace=None):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    request = {"op": "campaign", "id": 1, "election": election, "identity": identity}
    if namespace:
        request["namespace"] = namespace
    sock.sendall((json.dumps(request) + "\n").encode())
    leading = False
    for event in events(sock):
        kind = event["event"]
        if kind == "hello":
            print(f"connected to broker on node {event['node']}", flush=True)
        elif kind == "leader":
            print(f"leader {event['leader'] or '-'} term {event['term']}", flush=True)
        elif kind == "elected":
            leading = True
            print(f"elected term {event['term']}: working", flush=True)
        elif kind == "lost":
            leading = False
            print(f"lost term {event['term']} ({event['reason']}): stopped working", flush=True)
        elif kind == "error":
            print(f"error {event['code']}: {event['message']}", file=sys.stderr, flush=True)
            if event.get("id") == 1:
                raise SystemExit(2)
    if leading:
        print("lost (broker connection closed): stopped working", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=os.environ.get("ELECTOR_SOCKET", "/var/run/elector/elector.sock"))
    p.add_argument("--election", default="report-job")
    p.add_argument("--id", default=os.environ.get("POD_NAME", socket.gethostname()))
    p.add_argument("--namespace")
    args = p.parse_args()
    backoff = 0.1
    while True:
        try:
            campaign(args.socket, args.election, args.id, args.namespace)
            backoff = 0.1
        except OSError as e:
            print(f"broker unreachable ({e}); retrying in {backoff:.1f}s", file=sys.stderr, flush=True)
        time.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
