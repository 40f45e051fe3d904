"""Fixtures own every resource: faces close their sockets, processes are killed, paths are temporary."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from zfabric.patterns.forwarder import ForwarderProcess
from zfabric.sidecar.service import SidecarProcess

from .faces import Face

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sync", "async"])
def face(request: pytest.FixtureRequest) -> Iterator[Face]:
    """The same scenario over the sync face and over the asyncio face."""
    f = Face(request.param)
    yield f
    f.close_all()


@pytest.fixture
def sync_face() -> Iterator[Face]:
    f = Face("sync")
    yield f
    f.close_all()


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A short temp dir for ipc:// sockets (unix socket paths are limited to ~100 bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="zf-") as d:
        yield Path(d)


@pytest.fixture(params=["tcp", "ipc"])
def bind_address(request: pytest.FixtureRequest, ipc_dir: Path) -> Callable[[str], str]:
    """Makes bind addresses on one transport: tcp on port 0 (the OS picks), or ipc in a temp dir."""

    def make(name: str = "ep") -> str:
        if request.param == "tcp":
            return "tcp://127.0.0.1:0"
        return f"ipc://{ipc_dir}/{name}-{time.monotonic_ns()}"

    return make


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    """A raw zmq context for tests that play a foreign peer; terminated under a timeout."""
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


class Processes:
    """Child processes started by a test; every one is killed and reaped at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def zfabric(self, *args: str, **kwargs: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zfabric", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=kwargs.pop("stdin", subprocess.DEVNULL), text=True, cwd=ROOT, **kwargs,  # type: ignore[call-overload]
        )
        self.procs.append(proc)
        return proc

    def python(self, *args: str, **kwargs: object) -> subprocess.Popen[str]:
        """`python ARGS` from the repository root (e.g. `-m tests.reliable_actors worker ...`)."""
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True, cwd=ROOT, **kwargs,  # type: ignore[call-overload]
        )
        self.procs.append(proc)
        return proc

    def wait_line(self, proc: subprocess.Popen[str], pattern: str, timeout: float = 15.0,
                  stream: str = "stdout") -> re.Match[str]:
        """Read lines of `stream` until one matches `pattern` (a readiness line); fail with the output otherwise."""
        source = proc.stdout if stream == "stdout" else proc.stderr
        assert source is not None
        found: list[re.Match[str]] = []

        def reader() -> None:
            for line in source:
                m = re.search(pattern, line)
                if m:
                    found.append(m)
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        if not found:
            proc.kill()
            out, err = proc.communicate(timeout=5)
            raise AssertionError(f"no line matching {pattern!r} within {timeout} s;\nstdout:\n{out}\nstderr:\n{err}")
        return found[0]

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)  # a stopped child cannot die until it runs
                except ProcessLookupError:
                    pass
                p.kill()
            try:
                p.communicate(timeout=5)
            except Exception:
                pass


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    procs.kill_all()


@pytest.fixture
def forwarder_proc() -> Iterator[ForwarderProcess]:
    """A real `zfabric forwarder` child process on free ports."""
    fwd = ForwarderProcess().start()
    yield fwd
    fwd.stop()
    fwd.kill()


class Sidecars:
    """`zfabric sidecar` child processes; every one is killed at teardown."""

    def __init__(self) -> None:
        self.started: list[SidecarProcess] = []

    def start(self, store: Path, queues: list[str] | None = None, *, endpoint: str = "tcp://127.0.0.1:0",
              args: tuple[str, ...] = ()) -> SidecarProcess:
        sc = SidecarProcess(str(store), queues or ["orders"], endpoint=endpoint, extra_args=args).start()
        self.started.append(sc)
        return sc

    def close(self) -> None:
        for sc in self.started:
            sc.stop(3.0)
            sc.kill()


@pytest.fixture
def sidecars() -> Iterator[Sidecars]:
    s = Sidecars()
    yield s
    s.close()


def free_tcp_ports(n: int) -> list[int]:
    """n distinct ports the OS reports free right now (held together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll `predicate` until true or `timeout`; for state that has no event to wait on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


os.environ.setdefault("PYTHONUNBUFFERED", "1")
