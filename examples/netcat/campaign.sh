#!/bin/sh
# Campaign in an election through the elector broker with nothing but socat (or netcat) and
# print every event as it arrives. The campaign lasts as long as this script runs: when it
# exits, its connection closes and the next candidate leads at once.
#
#   examples/netcat/campaign.sh <election> <identity> [socket]
set -eu
election=${1:?usage: campaign.sh <election> <identity> [socket]}
identity=${2:?usage: campaign.sh <election> <identity> [socket]}
socket=${3:-${ELECTOR_SOCKET:-/var/run/elector/elector.sock}}
request=$(printf '{"op":"campaign","id":1,"election":"%s","identity":"%s"}' "$election" "$identity")

if command -v socat >/dev/null 2>&1; then
  # Send the request, then keep the connection open (cat holds stdin) and print events.
  { printf '%s\n' "$request"; exec cat; } | socat -t 31536000 - "UNIX-CONNECT:$socket"
else
  { printf '%s\n' "$request"; exec cat; } | nc -U "$socket"
fi
