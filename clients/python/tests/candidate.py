"""A separate client process for the failover test: campaigns and prints each event as a line,
until killed. Usage: candidate.py SOCKET ELECTION IDENTITY"""
import sys

from elector_client import Client, Elected, Leader, Lost


def main() -> None:
    socket_path, election, identity = sys.argv[1:4]
    with Client(socket_path) as client:
        for event in client.campaign(election, identity=identity):
            if isinstance(event, Elected):
                print(f"elected {event.term}", flush=True)
            elif isinstance(event, Lost):
                print(f"lost {event.term} {event.reason}", flush=True)
            elif isinstance(event, Leader):
                print(f"leader {event.leader} {event.term}", flush=True)


if __name__ == "__main__":
    main()
