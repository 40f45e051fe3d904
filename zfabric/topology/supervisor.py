"""`zfabric up`: run a topology's infrastructure (forwarders, sidecars) as supervised child processes.

Each component is `zfabric forwarder|sidecar --topology FILE --name NAME`, so it runs
exactly what the file declares. A component that exits is restarted with exponential
backoff (reset once it has stayed up for `STABLE_AFTER` seconds). The supervisor answers
`zfabric status` on the topology's control address with every component's state and
counters. One thread does all of it; stop() (a signal handler may call it) ends the loop,
and the components are stopped in the reverse of their start order.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from .._process import ChildProcess
from .._socket import has_message, readable, warn_exposed
from ..endpoint import Endpoint
from ..errors import ConfigError, FabricError
from .fabric import ensure_ipc_dir
from .load import load_topology
from .model import Topology

log = logging.getLogger("zfabric.up")

STATUS_REQUEST = b"zfabric-status/1"
"""The one request the control socket answers."""
STABLE_AFTER = 10.0
"""Seconds a component must stay up before its restart backoff starts again from the base."""
_COUNTERS = re.compile(r"^zfabric (?:forwarder|sidecar) counters (.*)")
_IO = {"forwarder": ("messages_in", "messages_out"), "sidecar": ("received", "delivered")}
"""Which counters are a component's messages in and out."""


@dataclass
class ComponentStatus:
    """What `zfabric status` shows for one component."""

    name: str
    kind: str
    address: str
    state: str = "starting"
    """starting, running, restarting (waiting out its backoff), failed or stopped."""
    pid: int | None = None
    restarts: int = 0
    started_at: float | None = None
    """Wall-clock time of the current run's start."""
    messages_in: int = 0
    messages_out: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    last_exit: int | None = None
    last_error: str = ""


class Component(ChildProcess):
    """One forwarder or sidecar of the topology, run as `zfabric KIND --topology FILE --name NAME`."""

    READY = re.compile(r"^zfabric (?:forwarder|sidecar) ready ")

    def __init__(self, kind: str, name: str, topology_file: str, address: str, *, stats_interval: float = 1.0,
                 ready_timeout: float = 15.0, linger_ms: int = 1000) -> None:
        super().__init__([kind, "--topology", topology_file, "--name", name, "--no-live",
                          "--stats-interval", f"{stats_interval:g}"], ready_timeout=ready_timeout, detached=True)
        self.what = f"{kind} {name}"  # type: ignore[misc]  # per instance: names the component in messages
        self.stop_timeout = max(5.0, linger_ms / 1000 + 2.0)
        """How long a stop waits after SIGTERM before SIGKILL: the component's linger (its peers' time to take
        what it already accepted) and 2 s more, at least 5 s."""
        self.status = ComponentStatus(name=name, kind=kind, address=address)
        self.failures = 0
        """Exits in a row without a stable run between them; sets the restart backoff."""
        self.next_start = 0.0
        self.up_since = 0.0

    def _on_line(self, line: str) -> None:
        match = _COUNTERS.match(line)
        if match is None:
            if line.strip():
                log.info("%s: %s", self.what, line.rstrip())
            return
        counters = {}
        for item in match.group(1).split():
            key, _, value = item.partition("=")
            if value.lstrip("-").isdigit():
                counters[key] = int(value)
        self.status.counters = counters
        inbound, outbound = _IO[self.status.kind]
        self.status.messages_in = counters.get(inbound, 0)
        self.status.messages_out = counters.get(outbound, 0)


class Supervisor:
    """Starts, watches, restarts and stops the forwarders and sidecars of one topology file."""

    def __init__(self, path: str | os.PathLike[str], *, topology: Topology | None = None, host: str | None = None,
                 backoff_base: float = 0.5, backoff_cap: float = 10.0, stats_interval: float = 1.0) -> None:
        self.path = str(Path(path).resolve())
        self.topology = topology if topology is not None else load_topology(path)
        if host is not None and host not in self.topology.hosts:
            raise ConfigError(f"--host {host!r} is not declared in {path} (hosts: {', '.join(self.topology.hosts) or 'none'})")
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.components: list[Component] = []
        for name, fwd in self.topology.forwarders.items():
            if host is None or self.topology.host_of(fwd.xsub) == host:
                self.components.append(Component("forwarder", name, self.path, f"xsub={fwd.xsub} xpub={fwd.xpub}",
                                                 stats_interval=stats_interval,
                                                 linger_ms=self.topology.options_for(fwd).linger_ms))
        for name, sc in self.topology.sidecars.items():
            if host is None or self.topology.host_of(sc.endpoint) == host:
                self.components.append(Component("sidecar", name, self.path, sc.endpoint, stats_interval=stats_interval,
                                                 linger_ms=self.topology.options.linger_ms))
        self._stop = threading.Event()
        self.started_at = time.time()

    # ---- status -------------------------------------------------------------------------

    def statuses(self) -> list[ComponentStatus]:
        """Each component's current status (pids refreshed)."""
        return [c.status for c in self.components]

    def report(self) -> dict[str, Any]:
        """What `zfabric status` receives: the topology, the supervisor's pid and every component."""
        return {"topology": self.topology.name, "file": self.path, "pid": os.getpid(), "since": self.started_at,
                "components": [asdict(s) for s in self.statuses()]}

    # ---- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask run() to stop everything (safe from a signal handler or another thread)."""
        self._stop.set()

    def run(self, *, on_ready: Callable[[Supervisor], None] | None = None,
            on_tick: Callable[[Supervisor], None] | None = None, tick: float = 0.5) -> None:
        """Start every component, then supervise until stop(); always stops the components before returning."""
        ctx = zmq.Context()
        control = None
        try:
            control = self._bind_control(ctx)
            for comp in self.components:
                self._first_start(comp)
            if on_ready is not None:
                on_ready(self)
            next_tick = time.monotonic()
            while not self._stop.is_set():
                if readable(control, 200):
                    self._answer(control)
                self._watch(time.monotonic())
                if on_tick is not None and time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + tick
                    on_tick(self)
        finally:
            for comp in reversed(self.components):
                if comp.proc is not None and comp.proc.poll() is None:
                    comp.stop(timeout=comp.stop_timeout)
                comp.status.state = "stopped"
                comp.status.pid = None
            if control is not None:
                control.close(0)
            ctx.term()

    def _first_start(self, comp: Component) -> None:
        try:
            comp.start()
        except FabricError as exc:
            raise FabricError(f"{comp.what} failed to start, so `up` stopped everything it had started: {exc}") from None
        self._running(comp)

    def _running(self, comp: Component) -> None:
        comp.status.state = "running"
        comp.status.pid = comp.pid
        comp.status.started_at = time.time()
        comp.status.counters = {}
        comp.status.messages_in = comp.status.messages_out = 0
        comp.up_since = time.monotonic()

    def _watch(self, now: float) -> None:
        if self._stop.is_set():
            return
        for comp in self.components:
            st = comp.status
            if st.state == "running" and comp.proc is not None and comp.proc.poll() is not None:
                stable = now - comp.up_since >= STABLE_AFTER
                comp.failures = 1 if stable else comp.failures + 1
                delay = min(self.backoff_cap, self.backoff_base * 2 ** (comp.failures - 1))
                st.last_exit = comp.proc.returncode
                st.state, st.pid = "restarting", None
                comp.next_start = now + delay
                tail = "".join(comp.output[-3:]).strip()
                st.last_error = tail.splitlines()[-1] if tail else ""
                log.warning("%s exited with code %s; restarting in %.1f s", comp.what, st.last_exit, delay)
            elif st.state == "restarting" and now >= comp.next_start:
                st.restarts += 1
                try:
                    comp.start()
                except FabricError as exc:
                    comp.failures += 1
                    comp.next_start = time.monotonic() + min(self.backoff_cap, self.backoff_base * 2 ** (comp.failures - 1))
                    st.last_error = str(exc).splitlines()[-1]
                    log.warning("%s did not restart: %s", comp.what, st.last_error)
                else:
                    self._running(comp)

    # ---- control socket -----------------------------------------------------------------

    def _bind_control(self, ctx: zmq.Context) -> zmq.Socket:
        address = self.topology.control
        assert address is not None
        existing = ask_status(address, timeout=0.3, context=ctx)
        if existing is not None:
            raise FabricError(f"`zfabric up` for topology {existing['topology']!r} is already running "
                              f"(pid {existing['pid']}, control {address})")
        ensure_ipc_dir(address)
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.maxmsgsize = 4096  # status requests are a few bytes; anything larger is not one
        warn_exposed("zfabric up status address", [Endpoint.parse(address, bind=True)])
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise FabricError(f"cannot bind the status address {address}: {exc.strerror}") from None
        return sock

    def _answer(self, sock: zmq.Socket) -> None:
        while has_message(sock):
            frames = sock.recv_multipart(zmq.NOBLOCK)
            if len(frames) == 2 and frames[1] == STATUS_REQUEST:
                sock.send_multipart([frames[0], msgpack.packb(self.report())], zmq.NOBLOCK)
            else:
                log.warning("status address: ignored a request that is not %r (%d frame(s))", STATUS_REQUEST, len(frames))


def ask_status(address: str, *, timeout: float = 2.0, context: zmq.Context | None = None) -> dict[str, Any] | None:
    """The report of the `zfabric up` answering at `address`, or None if none answers within `timeout`."""
    if address.startswith("ipc://") and not os.path.exists(address[len("ipc://"):]):
        return None
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.maxmsgsize = 16 << 20
    try:
        sock.connect(address)
        sock.send(STATUS_REQUEST)
        if not readable(sock, int(timeout * 1000)):
            return None
        try:
            reply = msgpack.unpackb(sock.recv(), raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise FabricError(f"{address} answered with something that is not a zfabric status report ({exc})") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("components"), list):
            raise FabricError(f"{address} answered with something that is not a zfabric status report")
        return reply
    finally:
        sock.close(0)
