"""Launchers for `zfabric` commands run as child processes (forwarder, sidecar), written once."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

from .errors import FabricError


def _die_with_parent(parent: int) -> None:
    """In the child before exec: ask Linux for SIGKILL when the parent exits (elsewhere: nothing).

    SIGKILL, not SIGTERM: a child that hangs must not outlive a killed supervisor (one
    forwarder, stuck in a lock, once ignored SIGTERM for an hour). Every child is crash-safe
    by design; a supervisor that stops normally still stops its children with SIGTERM.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)


class ChildProcess:
    """Runs `python -m zfabric ARGS` as a child and waits for its ready line, which tells its real addresses.

    Subclasses give the READY pattern and read the addresses from its match; pass port 0
    to let the OS pick free ports, so nothing collides when many run at once.
    """

    READY: ClassVar[re.Pattern[str]]
    what: ClassVar[str] = "zfabric process"

    def __init__(self, args: Sequence[str], *, ready_timeout: float = 15.0, detached: bool = False) -> None:
        self.args = [sys.executable, "-m", "zfabric", *args]
        self.ready_timeout = ready_timeout
        self.detached = detached
        """Run in its own session (a terminal's Ctrl-C reaches only the parent, which stops children in order);
        on Linux it is also killed if the parent dies, so a killed supervisor leaves no orphans."""
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._ready = threading.Event()
        self._matched = False

    def _on_ready(self, match: re.Match[str]) -> None:
        """Take the addresses from the ready line."""

    def _on_line(self, line: str) -> None:
        """Every other line the child prints (counters, warnings); subclasses may read them."""

    def start(self) -> Any:
        """Start the child and wait for its ready line; raises FabricError with its output if it fails."""
        # A fresh event per start: the reader of a child killed just before (a restart) still
        # signals at its end of output, and must not pass for this child's readiness.
        ready = self._ready = threading.Event()
        self._matched = False
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=self.detached,
                                     preexec_fn=functools.partial(_die_with_parent, os.getpid()) if self.detached else None)
        threading.Thread(target=self._pump, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(self.ready_timeout) or not self._matched:
            self.kill()
            raise FabricError(f"{self.what} did not become ready:\n" + "".join(self.output[-20:]))
        return self

    def _pump(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line)
            if len(self.output) > 1000:
                del self.output[:500]
            match = self.READY.match(line)
            if match and ready is self._ready:
                self._on_ready(match)
                self._matched = True
                ready.set()
            else:
                self._on_line(line)
        ready.set()

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the child (a crash, as far as everyone else can tell) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
