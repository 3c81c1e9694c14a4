"""The shared conformance scripts (clients/conformance/*.json, see the README there) played
against the asyncio client by a fake broker on a Unix socket. The Rust and Node.js clients play
the same scripts."""
from __future__ import annotations

import asyncio
import json
import os
import tempfile
import unittest
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from elector_client import (
    AsyncCampaign,
    AsyncClient,
    BrokerError,
    Elected,
    Jeopardy,
    Leader,
    Lost,
    Safe,
    monotonic_ns,
)

SCRIPTS = Path(
    os.environ.get("ELECTOR_CONFORMANCE_DIR") or Path(__file__).resolve().parents[2] / "conformance"
)
STEP_TIMEOUT = 5.0
#: How far a guarantee a client sends back (``"~$name"``) may be from the one it was given.
NEAR_NS = 100_000_000


def normalize(event: Any) -> Dict[str, Any]:
    if isinstance(event, Leader):
        out: Dict[str, Any] = {"type": "leader", "leader": event.leader, "term": event.term}
        if event.unknown is not None:
            out["unknown"] = event.unknown
        return out
    if isinstance(event, Elected):
        return {"type": "elected", "term": event.term}
    if isinstance(event, Lost):
        return {"type": "lost", "term": event.term, "reason": event.reason}
    if isinstance(event, Jeopardy):
        return {"type": "jeopardy", "term": event.term}
    if isinstance(event, Safe):
        return {"type": "safe", "term": event.term}
    raise AssertionError(f"not an event: {event!r}")


class ScriptFailed(AssertionError):
    pass


class Player:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.accepted: "asyncio.Queue[Tuple[asyncio.StreamReader, asyncio.StreamWriter]]" = asyncio.Queue()
        self.conn: Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = None
        #: Connections a later ``accept`` replaced while the broker left them open.
        self.earlier: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.client = AsyncClient(socket_path)
        self.connecting: Optional["asyncio.Task[Any]"] = None
        self.captures: Dict[str, Any] = {}
        self.calls: Dict[str, "asyncio.Task[Any]"] = {}
        self.handles: Dict[str, Any] = {}

    async def serve(self) -> asyncio.AbstractServer:
        async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self.accepted.put((r, w))

        return await asyncio.start_unix_server(on_client, path=self.socket_path)

    def substitute(self, v: Any) -> Any:
        if isinstance(v, str) and v.startswith("$"):
            if v[1:] not in self.captures:
                raise ScriptFailed(f"nothing captured as {v}")
            return self.captures[v[1:]]
        if isinstance(v, dict):
            return {k: self.substitute(x) for k, x in v.items()}
        if isinstance(v, list):
            return [self.substitute(x) for x in v]
        return v

    async def accept(self) -> None:
        try:
            conn = await asyncio.wait_for(self.accepted.get(), STEP_TIMEOUT)
        except asyncio.TimeoutError:
            raise ScriptFailed("the client did not connect") from None
        if self.conn is not None:
            self.earlier.append(self.conn)
        self.conn = conn

    async def expect_closed(self) -> None:
        """Each earlier connection ends (the client closed it) with no request first."""
        if not self.earlier:
            raise ScriptFailed("no earlier connection is open")
        while self.earlier:
            reader, writer = self.earlier[0]
            try:
                line = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
            except asyncio.TimeoutError:
                raise ScriptFailed("the client did not close its earlier connection") from None
            if line:
                raise ScriptFailed(f"the client sent {line!r} on its earlier connection")
            writer.close()
            self.earlier.pop(0)

    async def connected_client(self) -> AsyncClient:
        if self.connecting is not None:
            await asyncio.wait_for(self.connecting, STEP_TIMEOUT)
            self.connecting = None
        return self.client

    async def call(self, args: Dict[str, Any]) -> None:
        handle, op = args["handle"], args["op"]
        if op == "campaign":
            client = await self.connected_client()
            coro: Any = client.campaign(
                args["election"], identity=args["identity"], namespace=args.get("namespace"), lock=args.get("lock")
            )
        elif op == "observe":
            client = await self.connected_client()
            coro = client.observe(args["election"], namespace=args.get("namespace"), lock=args.get("lock"))
        elif op == "resign":
            campaign = self.handles[handle]
            assert isinstance(campaign, AsyncCampaign)
            coro = campaign.resign()
        else:
            raise ScriptFailed(f"unknown call op {op}")
        self.calls[handle] = asyncio.ensure_future(coro)

    async def finish(self, handle: str) -> Any:
        try:
            result = await asyncio.wait_for(self.calls.pop(handle), STEP_TIMEOUT)
        except asyncio.TimeoutError:
            raise ScriptFailed(f"call {handle} did not finish") from None
        if result is not None:
            self.handles[handle] = result
        return result

    async def write(self, line: str) -> None:
        if self.conn is None:
            raise ScriptFailed("no connection is open")
        self.conn[1].write((line + "\n").encode())
        await self.conn[1].drain()

    async def read_request(self, timeout: float) -> Optional[Dict[str, Any]]:
        if self.conn is None:
            raise ScriptFailed("no connection is open")
        line = await asyncio.wait_for(self.conn[0].readline(), timeout)
        if not line:
            return None
        value = json.loads(line)
        assert isinstance(value, dict), line
        return value

    def matches(self, got: Any, want: Any) -> bool:
        if isinstance(want, str) and want.startswith("~$"):
            target = self.substitute(want[1:])
            return isinstance(got, int) and abs(got - target) <= NEAR_NS
        return bool(got == want)

    def instant(self, name: str) -> int:
        value = self.substitute("$" + name)
        if not isinstance(value, int):
            raise ScriptFailed(f"{name} is not a clock reading")
        return value

    async def step(self, step: Dict[str, Any]) -> None:
        if "clock" in step:
            args = step["clock"]
            self.captures[args["name"]] = monotonic_ns() + int(args["in_ms"]) * 1_000_000
        elif "connect" in step:
            self.connecting = asyncio.ensure_future(self.client.connect())
            await self.accept()
        elif "accept" in step:
            await self.accept()
        elif "send" in step:
            await self.write(json.dumps(self.substitute(step["send"])))
        elif "send_raw" in step:
            await self.write(step["send_raw"])
        elif "expect_request" in step:
            want = step["expect_request"]
            try:
                got = await self.read_request(STEP_TIMEOUT)
            except asyncio.TimeoutError:
                raise ScriptFailed(f"no request; expected {want}") from None
            if got is None:
                raise ScriptFailed(f"connection closed; expected {want}")
            for k, v in want.items():
                if k not in got or not self.matches(got[k], v):
                    raise ScriptFailed(f"request {got} does not have {k} = {v!r}")
            if "capture" in step:
                self.captures[step["capture"]] = got["id"]
        elif "expect_no_request" in step:
            try:
                got = await self.read_request(step["expect_no_request"]["within_ms"] / 1000)
            except asyncio.TimeoutError:
                return
            if got is not None:
                raise ScriptFailed(f"unexpected request {got}")
        elif "expect_closed" in step:
            await self.expect_closed()
        elif "disconnect" in step:
            if self.conn is not None:
                self.conn[1].close()
                self.conn = None
        elif "call" in step:
            await self.call(step["call"])
        elif "returns" in step:
            await self.finish(step["returns"])
        elif "raises" in step:
            handle, code = step["raises"]["handle"], step["raises"]["code"]
            try:
                await self.finish(handle)
            except BrokerError as e:
                if e.code != code:
                    raise ScriptFailed(f"call {handle} raised {e.code}, not {code}") from e
                if type(e).__name__ != "".join(p.capitalize() for p in code.split("_")) + "Error":
                    raise ScriptFailed(f"{code} raised as {type(e).__name__}") from e
            else:
                raise ScriptFailed(f"call {handle} succeeded; expected {code}")
        elif "expect_events" in step:
            args = step["expect_events"]
            handle = args["handle"]
            for want in args["events"]:
                try:
                    event = await self.handles[handle].next_event(STEP_TIMEOUT)
                except asyncio.TimeoutError:
                    raise ScriptFailed(f"no event on {handle}; expected {want}") from None
                arrived = monotonic_ns()
                if event is None:
                    raise ScriptFailed(f"events of {handle} ended; expected {want}")
                if normalize(event) != want:
                    raise ScriptFailed(f"event on {handle}: got {normalize(event)}, expected {want}")
                if "not_before" in args:
                    at = self.instant(args["not_before"])
                    if arrived < at:
                        raise ScriptFailed(f"{want} came {(at - arrived) / 1e6:.3f} ms before {args['not_before']}")
                    late = args.get("late_ms", 1000) * 1_000_000
                    if arrived > at + late:
                        raise ScriptFailed(f"{want} came {(arrived - at) / 1e6:.3f} ms after {args['not_before']}")
        elif "expect_no_events" in step:
            args = step["expect_no_events"]
            try:
                event = await self.handles[args["handle"]].next_event(args["within_ms"] / 1000)
            except asyncio.TimeoutError:
                return
            raise ScriptFailed(f"unexpected event on {args['handle']}: {event if event is None else normalize(event)}")
        elif "expect_state" in step:
            args = step["expect_state"]
            campaign = self.handles[args["handle"]]
            assert isinstance(campaign, AsyncCampaign)
            got = {"is_leader": campaign.is_leader, "jeopardy": campaign.jeopardy}
            want = {k: v for k, v in args.items() if k != "handle"}
            if {k: got.get(k) for k in want} != want:
                raise ScriptFailed(f"state of {args['handle']} is {got}, expected {want}")
        elif "expect_end" in step:
            handle = step["expect_end"]
            try:
                event = await self.handles[handle].next_event(STEP_TIMEOUT)
            except asyncio.TimeoutError:
                raise ScriptFailed(f"events of {handle} did not end") from None
            if event is not None:
                raise ScriptFailed(f"events of {handle} go on: {normalize(event)}")
        else:
            raise ScriptFailed(f"unknown step {step}")


async def play(script: Dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        player = Player(os.path.join(d, "broker.sock"))
        server = await player.serve()
        try:
            for i, step in enumerate(script["steps"]):
                try:
                    await player.step(step)
                except ScriptFailed as e:
                    raise ScriptFailed(f"step {i} {json.dumps(step)}: {e}") from None
        finally:
            await player.client.close()
            server.close()
            for _, writer in player.earlier + ([player.conn] if player.conn is not None else []):
                writer.close()
            while not player.accepted.empty():  # connections the script never took up
                player.accepted.get_nowait()[1].close()


def scripts() -> List[Path]:
    return sorted(SCRIPTS.glob("*.json"))


class Conformance(unittest.TestCase):
    def test_scripts_exist(self) -> None:
        self.assertGreaterEqual(len(scripts()), 5, f"no conformance scripts in {SCRIPTS}")

    def test_every_script(self) -> None:
        for path in scripts():
            script = json.loads(path.read_text())
            with self.subTest(script=path.name):
                if "python" in script.get("known_divergences", {}):
                    with self.assertRaises(ScriptFailed):
                        asyncio.run(play(script))
                else:
                    asyncio.run(play(script))


if __name__ == "__main__":
    unittest.main()
