"""The blocking client: the asyncio client run on a background thread of its own, with the same
guarantees. Safe to use from several threads."""
from __future__ import annotations

import asyncio
import functools
import queue
import threading
import time
from typing import Any, Callable, Coroutine, Iterator, Optional, TypeVar, Union

from ._aio import _END, AsyncCampaign, AsyncClient, AsyncObservation, _Handle, _Membership, _new_loop_thread
from ._protocol import ClientClosed, Event, Hello, Lost, Status, Timing

T = TypeVar("T")


class LeadershipSignal(threading.Event):
    """Set the moment leadership ends (lost, disconnect, resign, close; not by a jeopardy,
    which keeps leading until its guarantee). ``lost_at`` is when
    (``time.monotonic()``); ``event`` is the ``Lost`` event, if there was one."""

    def __init__(self, term: int) -> None:
        super().__init__()
        self.term = term
        self.lost_at: Optional[float] = None
        self.event: Optional[Lost] = None
        self._release: Callable[[], None] = lambda: None

    def release(self) -> None:
        """Stops watching (the work is over)."""
        self._release()

    def _fire(self, event: Optional[Lost]) -> None:
        self.lost_at = time.monotonic()
        self.event = event
        self.set()


class _SyncHandle:
    def __init__(self, client: "Client", handle: _Handle) -> None:
        self._client = client
        self._handle = handle
        self._m: _Membership = handle._m

    @property
    def election(self) -> str:
        return self._m.election

    @property
    def namespace(self) -> str:
        return self._m.namespace

    @property
    def leader(self) -> Optional[str]:
        return self._m.leader

    @property
    def term(self) -> Optional[int]:
        return self._m.term

    @property
    def closed(self) -> bool:
        return self._m.closed

    def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event; None once closed. Raises ``TimeoutError`` after ``timeout`` seconds."""
        try:
            item = self._m.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no event within {timeout}s") from None
        if item is _END:
            self._m.events.put(_END)
            return None
        return item  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[Event]:
        """Every event in order, until resigned / closed (then the iteration ends cleanly)."""
        while True:
            event = self.next_event()
            if event is None:
                return
            yield event


class Observation(_SyncHandle):
    """An observation of one election; iterate it for ``Leader`` events."""

    def close(self) -> None:
        assert isinstance(self._handle, AsyncObservation)
        if not self._m.closed:
            self._client._call(self._handle.close())

    def __enter__(self) -> "Observation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Campaign(_SyncHandle):
    """A campaign in one election; iterate it for ``Leader``, ``Elected``, ``Lost``,
    ``Jeopardy`` and ``Safe`` events."""

    @property
    def identity(self) -> Optional[str]:
        return self._m.identity

    @property
    def is_leader(self) -> bool:
        """True between ``Elected`` and ``Lost``, a jeopardy included."""
        return self._m.is_leader

    @property
    def jeopardy(self) -> bool:
        """Leading without a broker, until ``valid_until`` at most (protocol 1.1)."""
        return self._m.jeopardy

    @property
    def valid_until(self) -> Optional[int]:
        """This leader's guarantee (CLOCK_MONOTONIC ns, see ``monotonic_ns()``), if any."""
        return self._m.valid_until

    def wait_elected(self, timeout: Optional[float] = None) -> int:
        """Blocks until this campaign leads; returns the term. ``TimeoutError`` after ``timeout``."""
        m = self._m
        woken = threading.Event()

        def listener(event: Optional[Event]) -> None:
            if m.is_leader or m.closed:
                woken.set()

        m.listeners.append(listener)
        try:
            listener(None)
            if not woken.wait(timeout):
                raise TimeoutError(f"not elected within {timeout}s")
        finally:
            m.listeners.remove(listener)
        if not m.is_leader:
            raise ClientClosed("the campaign was closed before it was elected")
        return m.term or 0

    def leading(self, timeout: Optional[float] = None) -> LeadershipSignal:
        """Waits until elected; returns a signal set the moment leadership ends. Call
        ``release()`` on it (or use ``with leader_only(campaign) as signal``) when done."""
        term = self.wait_elected(timeout)
        signal = LeadershipSignal(term)
        listener = self._m.lost_signal(term, signal._fire)
        self._m.listeners.append(listener)
        m = self._m

        def release() -> None:
            if listener in m.listeners:
                m.listeners.remove(listener)

        signal._release = release
        if not self._m.is_leader or self._m.term != term:
            listener(None)
        return signal

    def run_while_leader(self, work: Callable[[LeadershipSignal], T], timeout: Optional[float] = None) -> T:
        """Waits until elected, then runs ``work(signal)`` in this thread; ``signal`` (a
        ``threading.Event``) is set the moment leadership ends, and ``work`` must return soon
        after (check ``signal.is_set()`` or use ``signal.wait(seconds)`` as its sleep).
        Returns what ``work`` returns."""
        signal = self.leading(timeout)
        try:
            return work(signal)
        finally:
            signal.release()

    def resign(self) -> None:
        """Gives up the campaign; a ``Lost`` (resigned) event comes first if it led, then the
        iteration ends."""
        assert isinstance(self._handle, AsyncCampaign)
        if not self._m.closed:
            self._client._call(self._handle.resign())

    def __enter__(self) -> "Campaign":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._m.closed:
            self.resign()


class Client:
    """A blocking connection to the broker (``with Client(socket) as client: ...``). Connects at
    once (``ConnectError`` if the broker is unreachable); later disconnects are retried in the
    background with back-off, and campaigns and observations made again."""

    def __init__(
        self,
        socket: Optional[str] = None,
        *,
        initial_backoff: float = 0.05,
        max_backoff: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self._loop, self._thread = _new_loop_thread()
        self._async = AsyncClient(
            socket, initial_backoff=initial_backoff, max_backoff=max_backoff, connect_timeout=connect_timeout
        )
        self._closed = False
        try:
            self._call(self._async.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed and self._loop.is_closed():
            coro.close()
            raise ClientClosed("the client was closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def socket_path(self) -> str:
        return self._async.socket_path

    @property
    def hello(self) -> Optional[Hello]:
        return self._async.hello

    @property
    def connected(self) -> bool:
        return self._async.connected

    def campaign(
        self,
        election: str,
        identity: Optional[str] = None,
        namespace: Optional[str] = None,
        lock: Optional[str] = None,
        timing: Optional[Timing] = None,
        priority: Optional[int] = None,
    ) -> Campaign:
        """Becomes a candidate; returns once the broker accepted (or raises its error)."""
        handle = self._call(self._async.campaign(election, identity, namespace, lock, timing, priority))
        return Campaign(self, handle)

    def observe(self, election: str, namespace: Optional[str] = None, lock: Optional[str] = None) -> Observation:
        """Watches an election without taking part."""
        return Observation(self, self._call(self._async.observe(election, namespace, lock)))

    def resign(self, election: str, namespace: Optional[str] = None) -> None:
        self._call(self._async.resign(election, namespace))

    def status(self) -> Status:
        return self._call(self._async.status())

    def ping(self) -> None:
        self._call(self._async.ping())

    def close(self) -> None:
        """Closes the connection (the broker resigns its campaigns at once); iterations end."""
        if self._closed:
            return
        self._closed = True
        self._call(self._async.close())
        self._stop_loop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class leader_only:
    """Runs work only while ``campaign`` leads.

    As a decorator of a plain function, the function is called with a ``LeadershipSignal`` as
    its first argument once elected, and must return soon after the signal is set. As a
    decorator of an ``async def`` function (with an ``AsyncCampaign``), the coroutine runs as a
    task that is cancelled the moment leadership ends (``LeadershipLost`` is raised then). As a
    context manager (``with leader_only(campaign) as signal:``) it waits until elected.
    """

    def __init__(self, campaign: Union[Campaign, AsyncCampaign], timeout: Optional[float] = None) -> None:
        self.campaign = campaign
        self.timeout = timeout
        self._signal: Optional[LeadershipSignal] = None

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        campaign = self.campaign
        if asyncio.iscoroutinefunction(fn):
            if not isinstance(campaign, AsyncCampaign):
                raise TypeError("an async function needs an AsyncCampaign")

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                return await campaign.run_while_leader(lambda: fn(*args, **kwargs))

            return run_async
        if not isinstance(campaign, Campaign):
            raise TypeError("a plain function needs a (blocking) Campaign")

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            return campaign.run_while_leader(lambda signal: fn(signal, *args, **kwargs), self.timeout)

        return run

    def __enter__(self) -> LeadershipSignal:
        if not isinstance(self.campaign, Campaign):
            raise TypeError("with leader_only(...) needs a (blocking) Campaign")
        self._signal = self.campaign.leading(self.timeout)
        return self._signal

    def __exit__(self, *exc: Any) -> None:
        if self._signal is not None:
            self._signal.release()
            self._signal = None


