"""Runs a real `electord` for the tests: `--standalone` (locks in its memory), or on the test
Kubernetes API server whose kubeconfig is $ELECTOR_KUBECONFIG (locks outlive the broker, so a
restarted broker can resume its leaders). The binary comes from $ELECTORD. Both are set by the
Rust test tests/tests/clients.rs; tests that need them fail without them."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from typing import List, Optional


def electord_binary() -> str:
    path = os.environ.get("ELECTORD")
    if not path or not os.path.isfile(path):
        raise RuntimeError(
            "set ELECTORD to the electord binary (cargo build -p elector-broker --bin electord); "
            "tests/tests/clients.rs does this"
        )
    return path


def test_kubeconfig() -> str:
    path = os.environ.get("ELECTOR_KUBECONFIG")
    if not path or not os.path.isfile(path):
        raise RuntimeError(
            "set ELECTOR_KUBECONFIG to a kubeconfig of the test API server "
            "(cargo run -p elector-tests --bin test-apiserver); tests/tests/clients.rs does this"
        )
    return path


class Electord:
    """One broker process on a socket of its own (fast timing: lease 2 s): standalone, or on
    the API server of ``kubeconfig`` as node ``node``. ``takeover``: the socket path is another
    broker's, still running (a rolling upgrade: ``--takeover``)."""

    def __init__(
        self,
        socket_path: Optional[str] = None,
        kubeconfig: Optional[str] = None,
        node: str = "node-a",
        takeover: bool = False,
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="elector-py-")
        self.socket_path = socket_path or os.path.join(self._dir.name, "elector.sock")
        self.kubeconfig = kubeconfig
        self.node = node
        self.takeover = takeover
        self.process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> "Electord":
        where = (
            ["--kubeconfig", self.kubeconfig, "--node-name", self.node, "--attest=none"]
            if self.kubeconfig is not None
            else ["--standalone"]
        )
        args: List[str] = [
            electord_binary(), *where, "--socket", self.socket_path, "--http-addr", "",
            "--lease-duration", "2", "--renew-deadline", "1.5", "--retry-period", "0.25",
            "--shutdown-grace", "1", "--log", "error", *(["--takeover"] if self.takeover else []),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"electord exited with {self.process.returncode}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.socket_path)
                    s.settimeout(5)
                    if s.recv(4096).startswith(b'{"event":"hello"'):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("electord did not start listening within 20 s")

    def kill(self) -> None:
        """Like a crash: no clean shutdown, connections just close."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        self.kill()
        self._dir.cleanup()

    def __enter__(self) -> "Electord":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
