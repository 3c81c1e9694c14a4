"""The asyncio client: one connection to the broker, re-established with back-off whenever it
breaks; accepted campaigns and observations are made again on the new connection.

Guarantees (the same as the Rust client's):
- a leader whose broker goes away keeps leading only on a guarantee it can check: a protocol
  1.1 broker states ``valid_until`` on CLOCK_MONOTONIC with ``elected`` and every ``renewed``,
  and the greeting's ``monotonic_now`` shows whether this process reads the same clock. Then a
  disconnect is a ``Jeopardy``: the campaign goes on leading, the client reconnects with
  back-off and sends ``resume``, and the jeopardy ends in ``Safe`` (same term, fresh guarantee)
  or ``Lost``: ``broker_unavailable`` exactly at ``valid_until`` (never later) if no broker
  confirmed it, ``preempted`` if the broker refused. Without that guarantee (a 1.0 broker, a
  clock of another time namespace, a guarantee already past) any disconnect means "not leader"
  at once: ``Lost`` with reason ``disconnected`` before the client tries to reconnect;
- a broker that a successor took over from (a rolling upgrade) tells its leaders ``jeopardy``,
  then sends ``reconnect``: the client drops that connection itself at once (it does not wait
  for the broker to close it) and connects again without back-off, then resumes, campaigns and
  observes as after any disconnect;
- events of one campaign or observation arrive in the broker's order;
- fields and events this version does not know are ignored.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple, TypeVar

from ._protocol import (
    DEFAULT_SOCKET_PATH,
    LOCK_LEASE,
    MAX_LINE_BYTES,
    AlreadyCampaigningError,
    BrokerError,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    Elected,
    ElectorError,
    Event,
    Hello,
    Jeopardy,
    Leader,
    Lost,
    ProtocolError,
    Renewed,
    Safe,
    Status,
    Timing,
    WireEvent,
    broker_error,
    decode,
    encode,
    monotonic_ns,
    parse_election_event,
    parse_hello,
    parse_status,
    shares_clock,
)

log = logging.getLogger("elector_client")
T = TypeVar("T")

CAMPAIGN = "campaign"
OBSERVE = "observe"
_END = object()


class LeadershipLost(ElectorError):
    """Leadership ended while protected work ran. ``event`` is the ``Lost`` event (None if the
    campaign was resigned or closed); ``lost_at`` is when it arrived (``time.monotonic()``)."""

    def __init__(self, event: Optional[Lost], lost_at: float) -> None:
        reason = event.reason if event is not None else "closed"
        super().__init__(f"leadership lost ({reason})")
        self.event = event
        self.lost_at = lost_at


class _Membership:
    """One campaign or observation of a client: its request, state and event buffer. Touched
    only from the client's event loop, except ``events`` (thread-safe) and reads of the state."""

    def __init__(self, role: str, election: str, namespace: str, lock: str, request: Dict[str, Any]):
        self.role = role
        self.election = election
        self.namespace = namespace
        self.lock = lock
        self.request = request
        self.identity: Optional[str] = request.get("identity")
        self.accepted = False
        self.resigning = False
        self.closed = False
        self.leader: Optional[str] = None
        self.term: Optional[int] = None
        self.is_leader = False
        #: Leading without a broker until ``valid_until`` (protocol 1.1).
        self.jeopardy = False
        #: This leader's guarantee (CLOCK_MONOTONIC ns), when the broker's clock is ours.
        self.valid_until: Optional[int] = None
        self._expiry: Optional[asyncio.TimerHandle] = None
        self.events: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.ready = asyncio.Event()
        self.listeners: List[Callable[[Optional[Event]], None]] = []

    @property
    def key(self) -> Tuple[str, str, str]:
        return (self.namespace, self.election, self.role)

    def apply(self, event: WireEvent, shared_clock: bool) -> None:
        """A broker event of this membership. ``shared_clock``: the current broker's
        guarantees are on this process's CLOCK_MONOTONIC (else they are ignored)."""

        def guarantee(ns: Optional[int]) -> Optional[int]:
            return ns if shared_clock else None

        if isinstance(event, Leader):
            self.leader, self.term = event.leader, event.term
            self._deliver(event)
        elif isinstance(event, Elected):
            self._cancel_expiry()
            self.is_leader, self.jeopardy, self.leader, self.term = True, False, event.identity, event.term
            self.valid_until = guarantee(event.valid_until)
            self._deliver(dataclasses.replace(event, valid_until=self.valid_until))
        elif isinstance(event, Renewed):
            if self.is_leader and self.term == event.term:
                self.valid_until = guarantee(event.valid_until)
        elif isinstance(event, Safe):
            if self.jeopardy and self.term == event.term:
                self._cancel_expiry()
                self.jeopardy = False
                self.valid_until = guarantee(event.valid_until)
                self._deliver(event)
        elif isinstance(event, Jeopardy):
            # The broker hands off without releasing: hold on to the guarantee it states.
            if self.is_leader and self.term == event.term:
                self.valid_until = guarantee(event.valid_until)
            self.broker_gone("broker_shutdown")
        elif isinstance(event, Lost):
            was_leader = self.is_leader
            self._end_leadership()
            if was_leader:
                self._deliver(event)

    def broker_gone(self, reason: str) -> None:
        """The broker went away (or hands off): a leader with a guarantee left goes on in
        jeopardy until it runs out; any other leader has lost, for ``reason``."""
        if not self.is_leader:
            return
        if self.valid_until is not None and self.valid_until > monotonic_ns():
            if not self.jeopardy:
                self.jeopardy = True
                self._deliver(Jeopardy(
                    self.election, self.namespace, self.lock, self.identity or "", self.term or 0, self.valid_until
                ))
            self._arm_expiry()
            return
        term = self.term or 0
        self._end_leadership()
        self._deliver(Lost(self.election, self.namespace, self.lock, self.identity or "", term, reason))

    def _arm_expiry(self) -> None:
        self._cancel_expiry()
        assert self.valid_until is not None
        delay = max(0, self.valid_until - monotonic_ns()) / 1e9
        self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _expire(self) -> None:
        """At ``valid_until`` (never before: a timer that fires early is set again), a jeopardy
        nobody ended has lost."""
        self._expiry = None
        if not self.jeopardy or self.valid_until is None:
            return
        if monotonic_ns() < self.valid_until:
            self._arm_expiry()
            return
        term = self.term or 0
        self._end_leadership()
        self._deliver(Lost(self.election, self.namespace, self.lock, self.identity or "", term, "broker_unavailable"))

    def _end_leadership(self) -> None:
        self._cancel_expiry()
        self.is_leader = False
        self.jeopardy = False
        self.valid_until = None

    def _deliver(self, event: Event) -> None:
        self.events.put(event)
        self.ready.set()
        for listener in list(self.listeners):
            listener(event)

    def resume_request(self) -> Optional[Dict[str, Any]]:
        """What a leader in jeopardy asks of a (new) broker: ``resume`` with its claim."""
        if self.role != CAMPAIGN or not self.jeopardy or self.valid_until is None or self.term is None:
            return None
        return dict(self.request, op="resume", term=self.term, valid_until=self.valid_until)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._end_leadership()
        self.events.put(_END)
        self.ready.set()
        for listener in list(self.listeners):
            listener(None)

    async def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event, or None once the membership is closed and its events are read."""

        async def take() -> Any:
            while True:
                try:
                    item = self.events.get_nowait()
                except queue.Empty:
                    self.ready.clear()
                    await self.ready.wait()
                    continue
                if item is _END:
                    self.events.put(_END)  # later reads end too
                    return None
                return item

        if timeout is None:
            return await take()
        return await asyncio.wait_for(take(), timeout)

    def lost_signal(self, term: int, on_lost: Callable[[Optional[Lost]], None]) -> Callable[[Optional[Event]], None]:
        """A listener calling ``on_lost`` once when leadership of ``term`` ends."""
        fired = []

        def listener(event: Optional[Event]) -> None:
            if fired:
                return
            if event is None or isinstance(event, Lost) or (isinstance(event, Elected) and event.term != term):
                fired.append(True)
                on_lost(event if isinstance(event, Lost) else None)

        return listener


class _Handle:
    def __init__(self, client: "AsyncClient", m: _Membership) -> None:
        self._client = client
        self._m = m

    @property
    def election(self) -> str:
        return self._m.election

    @property
    def namespace(self) -> str:
        return self._m.namespace

    @property
    def lock(self) -> str:
        return self._m.lock

    @property
    def leader(self) -> Optional[str]:
        """Who leads, as last reported (None: nobody, or not known yet)."""
        return self._m.leader

    @property
    def term(self) -> Optional[int]:
        return self._m.term

    @property
    def closed(self) -> bool:
        return self._m.closed

    def __aiter__(self) -> "_Handle":
        return self

    async def __anext__(self) -> Event:
        event = await self._m.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event (raises asyncio.TimeoutError after ``timeout`` seconds); None once closed."""
        return await self._m.next_event(timeout)


class AsyncObservation(_Handle):
    """An observation of one election: ``async for event in observation`` yields ``Leader``
    events until it is closed."""

    async def close(self) -> None:
        """Stops observing (``unobserve``); the event iterator ends."""
        await self._client._leave(self._m, {"op": "unobserve", "election": self.election, "namespace": self.namespace})

    async def __aenter__(self) -> "AsyncObservation":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncCampaign(_Handle):
    """A campaign in one election: ``async for event in campaign`` yields ``Leader``,
    ``Elected``, ``Lost``, ``Jeopardy`` and ``Safe`` events until it is resigned or the client
    is closed."""

    @property
    def identity(self) -> Optional[str]:
        """The holder identity the broker campaigns under."""
        return self._m.identity

    @property
    def is_leader(self) -> bool:
        """True between ``Elected`` and ``Lost``, a jeopardy included (false at once on a
        disconnect without a guarantee)."""
        return self._m.is_leader

    @property
    def jeopardy(self) -> bool:
        """Leading without a broker, until ``valid_until`` at most (protocol 1.1)."""
        return self._m.jeopardy

    @property
    def valid_until(self) -> Optional[int]:
        """Until when this leader may act without hearing more (CLOCK_MONOTONIC ns, compare
        with ``elector_client.monotonic_ns()``); None when not leading, from a 1.0 broker, or
        when this process does not share the broker's clock."""
        return self._m.valid_until

    async def wait_elected(self, timeout: Optional[float] = None) -> int:
        """Waits until this campaign leads; returns the term (a fencing token)."""
        m = self._m
        loop = asyncio.get_running_loop()
        done: "asyncio.Future[None]" = loop.create_future()

        def listener(event: Optional[Event]) -> None:
            if not done.done() and (m.is_leader or m.closed):
                done.set_result(None)

        m.listeners.append(listener)
        try:
            listener(None)
            await asyncio.wait_for(asyncio.shield(done), timeout)
        finally:
            m.listeners.remove(listener)
        if not m.is_leader:
            raise ClientClosed("the campaign was closed before it was elected")
        return m.term or 0

    async def run_while_leader(self, work: Callable[[], Awaitable[T]]) -> T:
        """Waits until elected, then runs ``work()`` as a task that is cancelled the moment
        leadership ends (lost, disconnect, resign, close); it goes on through a jeopardy. Returns its result, or raises
        ``LeadershipLost`` if leadership ended first."""
        term = await self.wait_elected()
        m = self._m
        task = asyncio.ensure_future(work())
        ended: List[LeadershipLost] = []

        def on_lost(event: Optional[Lost]) -> None:
            ended.append(LeadershipLost(event, time.monotonic()))
            task.cancel()

        listener = m.lost_signal(term, on_lost)
        m.listeners.append(listener)
        if not m.is_leader or m.term != term:
            listener(None)
        try:
            return await task
        except asyncio.CancelledError:
            if ended and task.cancelled():
                raise ended[0] from None
            raise
        finally:
            m.listeners.remove(listener)

    async def resign(self) -> None:
        """Gives up the campaign (if leading, the broker hands over at once). A ``Lost`` event
        with reason ``resigned`` is delivered if it led; then the event iterator ends."""
        await self._client._leave(self._m, {"op": "resign", "election": self.election, "namespace": self.namespace})

    async def __aenter__(self) -> "AsyncCampaign":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if not self._m.closed:
            await self.resign()


class AsyncClient:
    """A connection to the broker. ``async with AsyncClient(socket) as client: ...``

    ``socket``: the broker's socket path (default ``$ELECTOR_SOCKET`` or
    ``/var/run/elector/elector.sock``). Reconnects with exponential back-off from
    ``initial_backoff`` to ``max_backoff`` seconds.
    """

    def __init__(
        self,
        socket: Optional[str] = None,
        *,
        initial_backoff: float = 0.05,
        max_backoff: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.socket_path = socket or os.environ.get("ELECTOR_SOCKET") or DEFAULT_SOCKET_PATH
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self._hello: Optional[Hello] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._reader: Optional[asyncio.StreamReader] = None
        self._connected: Optional[asyncio.Event] = None
        self._closed = False
        self._task: Optional["asyncio.Task[None]"] = None
        self._pending: Dict[int, "asyncio.Future[Dict[str, Any]]"] = {}
        self._memberships: Dict[Tuple[str, str, str], _Membership] = {}
        self._next_id = 1
        self._shared_clock = False

    # --- lifecycle -----------------------------------------------------------------------

    async def connect(self) -> "AsyncClient":
        """Connects and reads the greeting. Fails (``ConnectError`` or the broker's error) if
        the broker cannot be reached now; later disconnects are retried in the background."""
        if self._task is not None:
            return self
        self._connected = asyncio.Event()
        await self._dial()
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection: the broker resigns every campaign of it at once. Every event
        iterator ends."""
        if self._closed:
            return
        self._closed = True
        if self._connected is not None:
            self._connected.set()  # wakes waiters, which then see the client closed
        self._hello = None
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_pending(ClientClosed("the client was closed"))
        for m in list(self._memberships.values()):
            m.close()
        self._memberships.clear()

    @property
    def hello(self) -> Optional[Hello]:
        """The greeting of the current connection (None while disconnected)."""
        return self._hello

    @property
    def connected(self) -> bool:
        return not self._closed and self._connected is not None and self._connected.is_set()

    # --- operations ----------------------------------------------------------------------

    def _namespace(self, namespace: Optional[str]) -> str:
        if namespace is not None:
            return namespace
        return self._hello.default_namespace if self._hello is not None else "default"

    async def campaign(
        self,
        election: str,
        identity: Optional[str] = None,
        namespace: Optional[str] = None,
        lock: Optional[str] = None,
        timing: Optional[Timing] = None,
        priority: Optional[int] = None,
    ) -> AsyncCampaign:
        """Becomes a candidate; returns once the broker accepted. ``identity`` may be left out
        when the broker attests callers (it defaults to the pod name)."""
        await self._wait_connected()
        ns = self._namespace(namespace)
        request: Dict[str, Any] = {"op": "campaign", "election": election, "namespace": ns, "lock": lock or LOCK_LEASE}
        if identity is not None:
            request["identity"] = identity
        if timing is not None:
            request["timing"] = timing.to_wire()
        if priority is not None:
            request["priority"] = priority
        m = await self._join(CAMPAIGN, election, ns, lock or LOCK_LEASE, request)
        return AsyncCampaign(self, m)

    async def observe(self, election: str, namespace: Optional[str] = None, lock: Optional[str] = None) -> AsyncObservation:
        """Watches an election without taking part."""
        await self._wait_connected()
        ns = self._namespace(namespace)
        request = {"op": "observe", "election": election, "namespace": ns, "lock": lock or LOCK_LEASE}
        m = await self._join(OBSERVE, election, ns, lock or LOCK_LEASE, request)
        return AsyncObservation(self, m)

    async def resign(self, election: str, namespace: Optional[str] = None) -> None:
        """Resigns the campaign of this client in ``election``."""
        m = self._memberships.get((self._namespace(namespace), election, CAMPAIGN))
        if m is not None:
            await AsyncCampaign(self, m).resign()
        else:
            await self._request({"op": "resign", "election": election, "namespace": self._namespace(namespace)})

    async def status(self) -> Status:
        """This connection's campaigns and observations, as the broker sees them."""
        return parse_status(await self._request({"op": "status"}))

    async def ping(self) -> None:
        await self._request({"op": "ping"})

    # --- internals -----------------------------------------------------------------------

    async def _join(self, role: str, election: str, ns: str, lock: str, request: Dict[str, Any]) -> _Membership:
        key = (ns, election, role)
        if key in self._memberships:
            raise AlreadyCampaigningError(f"this client already has a {role} in {ns}/{election}")
        m = _Membership(role, election, ns, lock, request)
        # Registered before the request goes out: events may come before the ok.
        self._memberships[key] = m
        try:
            reply = await self._request(dict(request))
        except BaseException:
            if self._memberships.get(key) is m:
                del self._memberships[key]
            m.close()
            raise
        m.accepted = True
        if isinstance(reply.get("identity"), str):
            m.identity = reply["identity"]
        return m

    async def _leave(self, m: _Membership, request: Dict[str, Any]) -> None:
        if m.closed:
            return
        m.resigning = True
        try:
            if self.connected:
                await self._request(request)
            # Disconnected: the broker already dropped it with the connection, and it is not
            # made again on reconnect.
        except ConnectionLost:
            pass  # the broker resigns everything of a closed connection
        finally:
            if self._memberships.get(m.key) is m:
                del self._memberships[m.key]
            m.close()

    async def _wait_connected(self) -> None:
        if self._closed:
            raise ClientClosed("the client was closed")
        if self._connected is None:
            raise ClientClosed("the client is not connected: use connect() or async with")
        await self._connected.wait()
        if self._closed:
            raise ClientClosed("the client was closed")

    async def _request(self, request: Dict[str, Any]) -> Dict[str, Any]:
        await self._wait_connected()
        rid = self._next_id
        self._next_id += 1
        request["id"] = rid
        fut: "asyncio.Future[Dict[str, Any]]" = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            assert self._writer is not None
            self._writer.write(encode(request))
            await self._writer.drain()
        except (OSError, RuntimeError) as e:
            self._pending.pop(rid, None)
            raise ConnectionLost(f"writing to the broker failed: {e}") from e
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def _dial(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path, limit=MAX_LINE_BYTES + 2), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise ConnectError(f"cannot reach the broker at {self.socket_path}: {e}") from e
        try:
            first = await asyncio.wait_for(self._read_message(reader), self.connect_timeout)
        except asyncio.TimeoutError:
            writer.close()
            raise ConnectError(f"no greeting from {self.socket_path} within {self.connect_timeout}s") from None
        except BaseException:  # cancelled (the client closes) while waiting for the greeting
            writer.close()
            raise
        if first is None:
            writer.close()
            raise ConnectError(f"the broker at {self.socket_path} closed before greeting")
        if first.get("event") == "error":
            writer.close()
            raise broker_error(str(first.get("code")), str(first.get("message", "")))
        if first.get("event") != "hello":
            writer.close()
            raise ProtocolError(f"expected a greeting, got {first}")
        self._hello = parse_hello(first)
        self._shared_clock = shares_clock(self._hello)
        self._reader, self._writer = reader, writer
        assert self._connected is not None
        self._connected.set()

    @staticmethod
    async def _read_message(reader: asyncio.StreamReader) -> Optional[Dict[str, Any]]:
        """The next broker message; None at end of stream. Skips overlong and unparsable lines."""
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as e:
                if not e.partial.strip():
                    return None
                line = e.partial
            except asyncio.LimitOverrunError as e:
                # Discard the overlong line up to and including its newline.
                await reader.readexactly(e.consumed)
                while True:
                    try:
                        await reader.readuntil(b"\n")
                        break
                    except asyncio.LimitOverrunError as again:
                        await reader.readexactly(again.consumed)
                continue
            except (OSError, ValueError):
                return None
            msg = decode(line)
            if msg is not None:
                return msg

    async def _run(self) -> None:
        backoff = self.initial_backoff
        while True:
            assert self._reader is not None
            moved = False
            while True:
                msg = await self._read_message(self._reader)
                if msg is None:
                    break
                if msg.get("event") == "reconnect":
                    # A successor broker serves the socket now (a rolling upgrade): move there
                    # at once rather than wait for this broker to close.
                    log.info("the broker asks to reconnect (%s): moving to its successor", msg.get("reason"))
                    moved = True
                    break
                self._dispatch(msg)
            self._disconnected()
            while True:
                if moved:
                    moved = False  # the first attempt only: a failed one backs off as usual
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                try:
                    await self._dial()
                except ElectorError as e:
                    log.debug("reconnect to %s failed: %s", self.socket_path, e)
                    continue
                backoff = self.initial_backoff
                break
            self._remake()

    def _disconnected(self) -> None:
        assert self._connected is not None
        self._connected.clear()
        self._hello = None
        if self._writer is not None:
            self._writer.close()
        self._fail_pending(ConnectionLost("the connection to the broker was lost"))
        for m in list(self._memberships.values()):
            m.broker_gone("disconnected")

    def _remake(self) -> None:
        """On a new connection: leaders in jeopardy resume, the others campaign and observe
        again."""
        for m in list(self._memberships.values()):
            if not m.accepted or m.resigning:
                continue
            resume = m.resume_request()
            self._resend(m, resume if resume is not None else m.request, resume is not None)

    def _resend(self, m: _Membership, request: Dict[str, Any], resume: bool) -> None:
        assert self._writer is not None
        rid = self._next_id
        self._next_id += 1
        fut: "asyncio.Future[Dict[str, Any]]" = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut

        def done(f: "asyncio.Future[Dict[str, Any]]") -> None:
            self._pending.pop(rid, None)
            if f.cancelled() or not isinstance(f.exception(), BrokerError):
                return
            if resume and not m.closed and not m.resigning and self.connected:
                # A broker that cannot resume (protocol 1.0: unknown_op): campaign.
                log.info("the broker did not resume %s/%s (%s): campaigning", m.namespace, m.election, f.exception())
                self._resend(m, m.request, False)
            else:
                log.warning("the broker refused to make %s %s/%s again: %s", m.role, m.namespace, m.election, f.exception())

        fut.add_done_callback(done)
        self._writer.write(encode(dict(request, id=rid)))

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)
                # Resends nobody awaits: do not warn "exception never retrieved".
                fut.add_done_callback(lambda f: f.exception())

    def _dispatch(self, msg: Dict[str, Any]) -> None:
        kind = msg.get("event")
        rid = msg.get("id")
        if kind in ("ok", "status", "pong", "error") and isinstance(rid, int) and rid in self._pending:
            fut = self._pending.pop(rid)
            if fut.done():
                return
            if kind == "error":
                fut.set_exception(broker_error(str(msg.get("code")), str(msg.get("message", ""))))
            else:
                fut.set_result(msg)
            return
        if kind == "error":
            log.warning("broker error %s: %s", msg.get("code"), msg.get("message"))
            return
        event = parse_election_event(msg)
        if event is None:
            return  # hello, unknown events, stale replies
        roles = (CAMPAIGN, OBSERVE) if isinstance(event, Leader) else (CAMPAIGN,)
        for role in roles:
            m = self._memberships.get((event.namespace, event.election, role))
            if m is not None and not m.closed:
                m.apply(event, self._shared_clock)


def _new_loop_thread() -> Tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="elector-client", daemon=True)
    thread.start()
    return loop, thread
