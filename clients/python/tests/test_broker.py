"""The Python client against a real `electord --standalone` process ($ELECTORD)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import unittest
from typing import Any, List, Optional, Type

from elector_client import (
    AsyncClient,
    BrokerError,
    Client,
    ConnectError,
    Elected,
    IdentityInUseError,
    InvalidElectionError,
    InvalidTimingError,
    Leader,
    LeadershipLost,
    LeadershipSignal,
    Jeopardy,
    Lost,
    Safe,
    Timing,
    leader_only,
    monotonic_ns,
)

from .electord import Electord, test_kubeconfig

WAIT = 20.0  # generous: the CI machine is a loaded 2-core VM


def next_of(handle: Any, kind: Type[Any], timeout: float = WAIT) -> Any:
    """The next event of type ``kind`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind.__name__} within {timeout}s")
        event = handle.next_event(left)
        if event is None:
            raise AssertionError(f"events ended before a {kind.__name__}")
        if isinstance(event, kind):
            return event


def leader_event(handle: Any, leader: Optional[str], timeout: float = WAIT) -> Leader:
    deadline = time.monotonic() + timeout
    while True:
        event = next_of(handle, Leader, max(0.01, deadline - time.monotonic()))
        if event.leader == leader:
            return event  # type: ignore[no-any-return]


class BrokerTest(unittest.TestCase):
    def setUp(self) -> None:
        self.broker = Electord().start()
        self.addCleanup(self.broker.stop)

    def client(self) -> Client:
        c = Client(self.broker.socket_path)
        self.addCleanup(c.close)
        return c


class Campaigns(BrokerTest):
    def test_campaign_elected_then_lost_on_resign(self) -> None:
        client = self.client()
        campaign = client.campaign("report-job", identity="pod-a")
        self.assertEqual(campaign.identity, "pod-a")
        self.assertEqual(campaign.namespace, "default")
        elected = next_of(campaign, Elected)
        self.assertEqual((elected.identity, elected.election), ("pod-a", "report-job"))
        self.assertGreaterEqual(elected.term, 0)
        self.assertTrue(campaign.is_leader)
        self.assertEqual(campaign.wait_elected(1), elected.term)
        campaign.resign()
        lost = next_of(campaign, Lost)
        self.assertEqual((lost.reason, lost.term), ("resigned", elected.term))
        self.assertFalse(campaign.is_leader)
        self.assertIsNone(campaign.next_event(WAIT), "the iteration ends after resign")
        self.assertEqual(list(campaign), [])

    def test_observe_sees_every_leader_change(self) -> None:
        watcher = self.client()
        observation = watcher.observe("report-job")
        a = self.client().campaign("report-job", identity="pod-a")
        next_of(a, Elected)
        first = leader_event(observation, "pod-a")
        self.assertFalse(first.is_me)
        b = self.client().campaign("report-job", identity="pod-b")
        a.resign()
        next_of(b, Elected)
        second = leader_event(observation, "pod-b")
        self.assertGreater(second.term or 0, first.term or 0, "the term grows with each new holder")
        status = watcher.status()
        self.assertEqual([o.election for o in status.observations], ["report-job"])
        observation.close()
        self.assertEqual([e for e in observation if not isinstance(e, Leader)], [])

    def test_errors_are_exceptions_named_after_codes(self) -> None:
        client = self.client()
        with self.assertRaises(InvalidElectionError) as bad:
            client.campaign("Bad_Name", identity="pod-a")
        self.assertEqual(bad.exception.code, "invalid_election")
        with self.assertRaises(InvalidTimingError):
            client.campaign("report-job", identity="pod-a", timing=Timing(lease_duration=2, renew_deadline=3))
        client.campaign("report-job", identity="pod-a")
        with self.assertRaises(IdentityInUseError):
            self.client().campaign("report-job", identity="pod-a")
        with self.assertRaises(BrokerError):
            self.client().campaign("a" * 300, identity="pod-a")
        client.ping()  # the connection stays usable after errors
        with self.assertRaises(ConnectError):
            Client(self.broker.socket_path + ".missing")

    def test_iterator_ends_cleanly_on_close(self) -> None:
        client = Client(self.broker.socket_path)
        campaign = client.campaign("report-job", identity="pod-a")
        seen: List[Any] = []
        done = threading.Event()

        def consume() -> None:
            for event in campaign:
                seen.append(event)
            done.set()

        t = threading.Thread(target=consume)
        t.start()
        campaign.wait_elected(WAIT)
        client.close()
        self.assertTrue(done.wait(WAIT), "the iteration did not end on close")
        t.join(WAIT)
        self.assertTrue(any(isinstance(e, Elected) for e in seen), seen)

    def test_reconnects_after_broker_restart_and_campaigns_again(self) -> None:
        client = self.client()
        campaign = client.campaign("report-job", identity="pod-a")
        elected = next_of(campaign, Elected)
        self.assertIsNotNone(elected.valid_until, "electord's clock is this process's")
        self.broker.kill()
        # A leader with a guarantee rides out the disconnect in jeopardy...
        jeopardy = next_of(campaign, Jeopardy)
        self.assertEqual(jeopardy.term, elected.term)
        # ...but a standalone broker keeps its locks in memory: restarted, it cannot confirm
        # the leadership (lost, preempted), or the guarantee runs out first (broker_unavailable).
        self.broker.start()
        lost = next_of(campaign, Lost)
        self.assertIn(lost.reason, ("preempted", "broker_unavailable"))
        again = next_of(campaign, Elected)
        self.assertTrue(campaign.is_leader)
        self.assertEqual(again.identity, "pod-a")
        self.assertTrue(client.connected)
        self.assertEqual([c.identity for c in client.status().campaigns], ["pod-a"])

    def test_failover_between_two_client_processes(self) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

        def spawn(identity: str) -> "subprocess.Popen[str]":
            p = subprocess.Popen(
                [sys.executable, os.path.join(here, "candidate.py"), self.broker.socket_path, "failover", identity],
                stdout=subprocess.PIPE, text=True, env=env,
            )
            self.addCleanup(lambda: (p.kill(), p.wait(), p.stdout and p.stdout.close()))
            return p

        def wait_line(p: "subprocess.Popen[str]", prefix: str) -> str:
            result: List[str] = []

            def read() -> None:
                assert p.stdout is not None
                for line in p.stdout:
                    if line.startswith(prefix):
                        result.append(line.strip())
                        return

            t = threading.Thread(target=read, daemon=True)
            t.start()
            t.join(WAIT)
            self.assertTrue(result, f"{prefix!r} not printed within {WAIT}s")
            return result[0]

        a = spawn("pod-a")
        first = int(wait_line(a, "elected").split()[1])
        b = spawn("pod-b")
        wait_line(b, "leader pod-a")
        a.kill()
        second = int(wait_line(b, "elected").split()[1])
        self.assertGreater(second, first)


class LeaderOnly(BrokerTest):
    def test_work_stops_within_100ms_of_lost(self) -> None:
        client = self.client()
        campaign = client.campaign("report-job", identity="pod-a")
        stopped_at: List[float] = []
        signals: List[LeadershipSignal] = []

        @leader_only(campaign)
        def work(signal: LeadershipSignal, label: str) -> str:
            signals.append(signal)
            deadline = time.monotonic() + WAIT
            while not signal.wait(0.005) and time.monotonic() < deadline:
                pass
            stopped_at.append(time.monotonic())
            return label

        resigner = threading.Timer(0.3, campaign.resign)
        resigner.start()
        self.assertEqual(work("done"), "done")
        resigner.join()
        signal = signals[0]
        self.assertIsNotNone(signal.event)
        assert signal.event is not None and signal.lost_at is not None
        self.assertEqual(signal.event.reason, "resigned")
        self.assertLess(stopped_at[0] - signal.lost_at, 0.1)

    def test_context_manager_form(self) -> None:
        client = self.client()
        campaign = client.campaign("report-job", identity="pod-a")
        with leader_only(campaign) as signal:
            self.assertFalse(signal.is_set())
            self.broker.kill()
            # The work goes on through the jeopardy, and stops when its guarantee runs out
            # with no broker to confirm it: not before valid_until.
            jeopardy = next_of(campaign, Jeopardy)
            self.assertFalse(signal.is_set(), "a jeopardy does not end leadership")
            self.assertTrue(campaign.is_leader and campaign.jeopardy)
            self.assertTrue(signal.wait(WAIT), "the guarantee ran out")
            assert signal.event is not None and signal.lost_at is not None
            self.assertEqual(signal.event.reason, "broker_unavailable")
            # time.monotonic() is CLOCK_MONOTONIC on Linux: the guarantee's clock.
            self.assertGreaterEqual(signal.lost_at * 1e9, jeopardy.valid_until - 1e3)  # float rounding
            self.assertFalse(campaign.is_leader)

    def test_async_work_is_cancelled_within_100ms_of_lost(self) -> None:
        async def scenario() -> None:
            async with AsyncClient(self.broker.socket_path) as client:
                campaign = await client.campaign("report-job", identity="pod-a")
                cancelled_at: List[float] = []

                @leader_only(campaign)
                async def work() -> None:
                    try:
                        await asyncio.sleep(3600)
                    finally:
                        cancelled_at.append(time.monotonic())

                # The broker's lost (resigned) comes before its ok: the resign is awaited below,
                # before the client closes.
                resigned: List["asyncio.Future[None]"] = []
                asyncio.get_running_loop().call_later(0.3, lambda: resigned.append(asyncio.ensure_future(campaign.resign())))
                with self.assertRaises(LeadershipLost) as lost:
                    await asyncio.wait_for(work(), WAIT)
                await asyncio.wait_for(resigned[0], WAIT)
                assert lost.exception.event is not None
                self.assertEqual(lost.exception.event.reason, "resigned")
                self.assertLess(cancelled_at[0] - lost.exception.lost_at, 0.1)

        asyncio.run(scenario())


class BrokerSurvival(unittest.TestCase):
    """Protocol 1.1 against real brokers on the test API server (the lock outlives a broker)."""

    # A renew deadline with room for a broker restart on a loaded CI machine.
    TIMING = Timing(lease_duration=12, renew_deadline=8, retry_period=1)

    def setUp(self) -> None:
        self.broker = Electord(kubeconfig=test_kubeconfig()).start()
        self.addCleanup(self.broker.stop)

    def test_broker_killed_and_restarted_within_the_deadline_costs_no_leadership(self) -> None:
        client = Client(self.broker.socket_path)
        self.addCleanup(client.close)
        campaign = client.campaign("survival-py", identity="pod-a", timing=self.TIMING)
        elected = next_of(campaign, Elected)
        assert elected.valid_until is not None, "electord's clock is this process's"
        self.assertGreater(elected.valid_until, monotonic_ns())
        with leader_only(campaign) as signal:
            self.broker.kill()  # SIGKILL: nothing released
            jeopardy = next_of(campaign, Jeopardy)
            self.assertEqual(jeopardy.term, elected.term)
            self.assertTrue(campaign.is_leader and campaign.jeopardy)
            self.broker.start()  # the same socket path
            seen: List[Any] = []
            while True:
                event = campaign.next_event(WAIT)
                self.assertIsNotNone(event, "the campaign ended")
                self.assertNotIsInstance(event, (Lost, Elected), f"leadership changed: {seen + [event]}")
                seen.append(event)
                if isinstance(event, Safe):
                    break
            self.assertLess(monotonic_ns(), jeopardy.valid_until, "safe came before the guarantee ran out")
            self.assertEqual(event.term, elected.term, "same term")
            self.assertGreater(event.valid_until, monotonic_ns(), "a fresh guarantee")
            self.assertFalse(signal.is_set(), "the leader-only work ran on throughout")
            self.assertTrue(campaign.is_leader)
            self.assertFalse(campaign.jeopardy)
        self.assertEqual(campaign.term, elected.term)
        # The broker's view (status, leader events) follows its safe: wait for it, bounded.
        deadline = time.monotonic() + WAIT
        while True:
            seen_by_broker = [(c.identity, c.is_me, c.term) for c in client.status().campaigns]
            if seen_by_broker == [("pod-a", True, elected.term)] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual(seen_by_broker, [("pod-a", True, elected.term)])
        self.assertTrue(campaign.is_leader and not campaign.jeopardy)

    def test_rolling_upgrade_moves_the_leader_to_the_successor_without_back_off(self) -> None:
        # A back-off far beyond the guarantee: only a client that reconnects at once on the old
        # broker's `reconnect` resumes in time; one that waited for the close and backed off
        # would lose at valid_until.
        client = Client(self.broker.socket_path, initial_backoff=120.0, max_backoff=120.0)
        self.addCleanup(client.close)
        campaign = client.campaign("upgrade-py", identity="pod-a", timing=self.TIMING)
        elected = next_of(campaign, Elected)
        assert elected.valid_until is not None, "electord's clock is this process's"
        with leader_only(campaign) as signal:
            successor = Electord(self.broker.socket_path, kubeconfig=test_kubeconfig(), takeover=True)
            self.addCleanup(successor.stop)
            successor.start()  # the old broker tells jeopardy, then reconnect
            seen: List[Any] = []
            while True:
                event = campaign.next_event(WAIT)
                self.assertIsNotNone(event, "the campaign ended")
                self.assertNotIsInstance(event, (Lost, Elected), f"leadership changed: {seen + [event]}")
                seen.append(event)
                if isinstance(event, Safe):
                    break
            moves = [(type(e).__name__, e.term) for e in seen if not isinstance(e, Leader)]
            self.assertEqual(moves, [("Jeopardy", elected.term), ("Safe", elected.term)], seen)
            self.assertFalse(signal.is_set(), "the leader-only work ran on throughout")
            self.assertTrue(campaign.is_leader and not campaign.jeopardy)
        # The successor serves this client; its view (status) follows its safe: wait for it,
        # bounded.
        deadline = time.monotonic() + WAIT
        while True:
            seen_by_broker = [(c.identity, c.is_me, c.term) for c in client.status().campaigns]
            if seen_by_broker == [("pod-a", True, elected.term)] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual(seen_by_broker, [("pod-a", True, elected.term)])


class AsyncApi(BrokerTest):
    def test_async_for_campaign_and_observe(self) -> None:
        async def scenario() -> None:
            async with AsyncClient(self.broker.socket_path) as client:
                observation = await client.observe("report-job")
                async with await client.campaign("report-job", identity="pod-a") as campaign:
                    self.assertEqual(await campaign.wait_elected(WAIT), campaign.term)
                    async for event in observation:
                        if isinstance(event, Leader) and event.leader == "pod-a":
                            self.assertTrue(event.is_me, "this connection's candidate leads")
                            break
                kinds = [type(e).__name__ async for e in campaign]
                self.assertIn("Lost", kinds, "resigning on leaving the block reports lost")
                self.assertTrue(campaign.closed)
                await observation.close()
                self.assertEqual([e async for e in observation if not isinstance(e, Leader)], [])
            self.assertFalse(client.connected)

        asyncio.run(scenario())


if __name__ == "__main__":
    unittest.main()
