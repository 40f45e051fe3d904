"""`Fabric`: a service's view of a topology. Ask for a queue, topic, service or group by name; get the
ordinary zfabric object, wired to the right address with the topology's options.

    fabric = Fabric.from_topology("topologies/shop.yaml")   # or set ZFABRIC_TOPOLOGY
    orders = fabric.producer("orders")                      # ReliableProducer: orders has a sidecar
    price = fabric.requester("pricing").request({"sku": "A1"})

Every object it makes is one a user could build by hand from the same values; `close()`
closes them all.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from ..errors import ConfigError
from ..options import SocketOptions
from ..patterns.forwarder import Forwarder
from ..patterns.pubsub import AsyncPublisher, AsyncSubscriber, Publisher, Subscriber
from ..patterns.queue import AsyncConsumer, AsyncProducer, Consumer, Producer
from ..patterns.reliable import AsyncReliableProducer, ReliableProducer
from ..patterns.reqrep import AsyncReplier, AsyncRequester, Replier, Requester
from ..patterns.scatter import AsyncScatterer, Scatterer
from ..patterns.worker import AsyncWorker, Worker
from ..security.curve import Curve
from ..security.permissions import Permissions
from ..security.zap import Allowlist
from ..sidecar.service import Sidecar
from .load import load_topology
from .model import Topology

ENV_VAR = "ZFABRIC_TOPOLOGY"
"""Environment variable naming the topology file when `from_topology()` gets no path."""
IDENTITY_VAR = "ZFABRIC_IDENTITY"
"""Environment variable naming this service's key when the topology uses CURVE."""

T = TypeVar("T")


def ensure_ipc_dir(address: str) -> None:
    """Create the directory of an ipc:// address, so binding to it works on a fresh machine."""
    if address.startswith("ipc://"):
        Path(address[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)


class Fabric:
    """The parts of one topology by name, sync or asyncio (`asyncio=True`); extra keywords go to the constructor."""

    def __init__(self, topology: Topology, *, identity: str | None = None, context: Any = None) -> None:
        self.topology = topology
        self.identity = identity or os.environ.get(IDENTITY_VAR) or None
        """The key name this service connects with, when the topology uses CURVE."""
        self._context = context
        self._made: list[Any] = []
        self._allow: Allowlist | None = None

    @classmethod
    def from_topology(cls, path: str | os.PathLike[str] | None = None, *, identity: str | None = None,
                      context: Any = None) -> Fabric:
        """Load `path` (default: the file named by $ZFABRIC_TOPOLOGY); TopologyError lists any problems.

        With CURVE, `identity` (default: $ZFABRIC_IDENTITY) names this service's key pair.
        """
        if path is None:
            path = os.environ.get(ENV_VAR)
            if not path:
                raise ConfigError(f"no topology file given and ${ENV_VAR} is not set")
        return cls(load_topology(path), identity=identity, context=context)

    # ---- lookups ------------------------------------------------------------------------

    def _get(self, kind: str, table: Mapping[str, T], name: str) -> T:
        if name in table:
            return table[name]
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"did you mean {close[0]!r}?" if close else (f"declared: {', '.join(table)}" if table else f"it declares no {kind}s")
        raise ConfigError(f"topology {self.topology.name!r} ({self.topology.source}) has no {kind} {name!r}; {hint}")

    def _keep(self, obj: T) -> T:
        self._made.append(obj)
        return obj

    def _common(self, options: SocketOptions, kwargs: dict[str, Any], part: tuple[str, str], *,
                server: bool = False) -> dict[str, Any]:
        """Constructor keywords: the part's options, with CURVE as server (it binds) or client when secured."""
        if "options" not in kwargs:
            kwargs["options"] = self._secured(options, part, server=server)
        if self._context is not None:
            kwargs.setdefault("context", self._context)
        return kwargs

    def client_options(self, part: tuple[str, str]) -> SocketOptions:
        """The fabric's options for connecting to `part` ("sidecars", "store"): with CURVE, this service's key
        and the part's public key. For clients zfabric has no class for (tools, other protocols)."""
        return self._secured(self.topology.options, part, server=False)

    def _secured(self, options: SocketOptions, part: tuple[str, str], *, server: bool) -> SocketOptions:
        sec = self.topology.security
        if sec is None:
            return options
        key = sec.key_of(*part)
        if server:
            if self._allow is None:
                self._allow = Allowlist(sec.keys, only=sec.allow)
            return options.replace(curve=Curve(sec.secret_key(key), allow=self._allow))
        if self.identity is None:
            raise ConfigError(f"topology {self.topology.name!r} uses CURVE: say which key this service connects with, "
                              f"Fabric.from_topology(path, identity=NAME) or {IDENTITY_VAR}=NAME "
                              f"(its secret NAME.key_secret goes in {sec.secrets})")
        return options.replace(curve=Curve(sec.secret_key(self.identity), server_key=sec.public_key(key).public))

    def _permissions(self) -> Permissions | None:
        return self.topology.security.permissions if self.topology.security is not None else None

    # ---- queues -------------------------------------------------------------------------

    @overload
    def producer(self, queue: str, *, asyncio: Literal[False] = ..., **kwargs: Any) -> Producer | ReliableProducer: ...

    @overload
    def producer(self, queue: str, *, asyncio: Literal[True], **kwargs: Any) -> AsyncProducer | AsyncReliableProducer: ...

    def producer(self, queue: str, *, asyncio: bool = False, **kwargs: Any) -> Producer | ReliableProducer | AsyncProducer | AsyncReliableProducer:
        """A producer for `queue`: ReliableProducer (to its sidecar) or Producer (plain), sync or asyncio."""
        spec = self._get("queue", self.topology.queues, queue)
        if spec.sidecar is not None:
            endpoint = self._get("sidecar", self.topology.sidecars, spec.sidecar).endpoint
            kw = self._common(self.topology.options_for(spec), kwargs, ("sidecars", spec.sidecar))
            return self._keep((AsyncReliableProducer if asyncio else ReliableProducer)(endpoint, queue, **kw))
        assert spec.address is not None
        ensure_ipc_dir(spec.address)
        kw = self._common(self.topology.options_for(spec), kwargs, ("queues", queue), server=spec.bind == "producer")
        kw.setdefault("send_timeout", spec.send_timeout)
        if spec.backlog is not None:
            kw.setdefault("backlog", spec.backlog)
        return self._keep((AsyncProducer if asyncio else Producer)(spec.address, bind=spec.bind == "producer",
                                                                    queue=queue, **kw))

    @overload
    def consumer(self, queue: str, *, asyncio: Literal[False] = ..., **kwargs: Any) -> Consumer: ...

    @overload
    def consumer(self, queue: str, *, asyncio: Literal[True], **kwargs: Any) -> AsyncConsumer: ...

    def consumer(self, queue: str, *, asyncio: bool = False, **kwargs: Any) -> Consumer | AsyncConsumer:
        """A consumer of the plain queue `queue` (a reliable queue is consumed by `worker()`)."""
        spec = self._get("queue", self.topology.queues, queue)
        if spec.address is None:
            raise ConfigError(f"queue {queue!r} is reliable (sidecar {spec.sidecar!r}): take its messages with "
                              f"fabric.worker({queue!r}, handler)")
        ensure_ipc_dir(spec.address)
        kw = self._common(self.topology.options_for(spec), kwargs, ("queues", queue), server=spec.bind == "consumer")
        return self._keep((AsyncConsumer if asyncio else Consumer)(spec.address, bind=spec.bind == "consumer", **kw))

    @overload
    def worker(self, queue: str, handler: Callable[..., Any], *, asyncio: Literal[False] = ..., **kwargs: Any) -> Worker: ...

    @overload
    def worker(self, queue: str, handler: Callable[..., Any], *, asyncio: Literal[True], **kwargs: Any) -> AsyncWorker: ...

    def worker(self, queue: str, handler: Callable[..., Any], *, asyncio: bool = False, **kwargs: Any) -> Worker | AsyncWorker:
        """A worker for the reliable queue `queue`: the handler's outcome acks, retries or dead-letters."""
        spec = self._get("queue", self.topology.queues, queue)
        if spec.sidecar is None:
            raise ConfigError(f"queue {queue!r} is a plain queue: read it with fabric.consumer({queue!r}); "
                              "workers need a reliable queue (one with a sidecar)")
        endpoint = self._get("sidecar", self.topology.sidecars, spec.sidecar).endpoint
        kw = self._common(self.topology.options_for(spec), kwargs, ("sidecars", spec.sidecar))
        return self._keep((AsyncWorker if asyncio else Worker)(endpoint, queue, handler, **kw))

    # ---- pub/sub ------------------------------------------------------------------------

    def _forwarder_of(self, topic: str) -> tuple[str, Any]:
        if topic in self.topology.topics:
            name = self.topology.topics[topic].forwarder
        elif topic in self.topology.forwarders:
            name = topic
        else:
            self._get("topic", self.topology.topics, topic)
        return name, self._get("forwarder", self.topology.forwarders, name)

    @overload
    def publisher(self, topic: str, *, asyncio: Literal[False] = ..., **kwargs: Any) -> Publisher: ...

    @overload
    def publisher(self, topic: str, *, asyncio: Literal[True], **kwargs: Any) -> AsyncPublisher: ...

    def publisher(self, topic: str, *, asyncio: bool = False, **kwargs: Any) -> Publisher | AsyncPublisher:
        """A publisher connected to the forwarder that carries `topic` (a topic or forwarder name)."""
        name, fwd = self._forwarder_of(topic)
        kw = self._common(self.topology.options_for(fwd), kwargs, ("forwarders", name))
        return self._keep((AsyncPublisher if asyncio else Publisher)(fwd.xsub, **kw))

    @overload
    def subscriber(self, *topics: str, asyncio: Literal[False] = ..., **kwargs: Any) -> Subscriber: ...

    @overload
    def subscriber(self, *topics: str, asyncio: Literal[True], **kwargs: Any) -> AsyncSubscriber: ...

    def subscriber(self, *topics: str, asyncio: bool = False, **kwargs: Any) -> Subscriber | AsyncSubscriber:
        """A subscriber to one or more declared topics, all carried by the same forwarder."""
        if not topics:
            raise ConfigError("subscriber(): name at least one topic")
        forwarders = {self._forwarder_of(t)[0] for t in topics}
        if len(forwarders) > 1:
            raise ConfigError(f"topics {', '.join(topics)} are carried by different forwarders "
                              f"({', '.join(sorted(forwarders))}); make one subscriber per forwarder")
        name = forwarders.pop()
        fwd = self.topology.forwarders[name]
        kw = self._common(self.topology.options_for(fwd), kwargs, ("forwarders", name))
        subscribed = [t for t in topics if t in self.topology.topics]
        return self._keep((AsyncSubscriber if asyncio else Subscriber)(fwd.xpub, topics=subscribed, **kw))

    # ---- request-reply and scatter-gather -----------------------------------------------

    @overload
    def requester(self, service: str, *, asyncio: Literal[False] = ..., **kwargs: Any) -> Requester: ...

    @overload
    def requester(self, service: str, *, asyncio: Literal[True], **kwargs: Any) -> AsyncRequester: ...

    def requester(self, service: str, *, asyncio: bool = False, **kwargs: Any) -> Requester | AsyncRequester:
        """A requester for `service`, with the service's timeout and retries."""
        spec = self._get("service", self.topology.services, service)
        ensure_ipc_dir(spec.address)
        kw = self._common(self.topology.options_for(spec), kwargs, ("services", service))
        kw.setdefault("timeout", spec.timeout)
        kw.setdefault("retries", spec.retries)
        kw.setdefault("service", service)
        return self._keep((AsyncRequester if asyncio else Requester)(spec.address, **kw))

    @overload
    def replier(self, service: str, handler: Callable[..., Any], *, asyncio: Literal[False] = ..., **kwargs: Any) -> Replier: ...

    @overload
    def replier(self, service: str, handler: Callable[..., Any], *, asyncio: Literal[True], **kwargs: Any) -> AsyncReplier: ...

    def replier(self, service: str, handler: Callable[..., Any], *, asyncio: bool = False, **kwargs: Any) -> Replier | AsyncReplier:
        """The replier that serves `service`, bound to its address."""
        spec = self._get("service", self.topology.services, service)
        ensure_ipc_dir(spec.address)
        kw = self._common(self.topology.options_for(spec), kwargs, ("services", service), server=True)
        kw.setdefault("name", service)
        kw.setdefault("permissions", self._permissions())
        return self._keep((AsyncReplier if asyncio else Replier)(spec.address, handler, bind=True, **kw))

    @overload
    def scatterer(self, group: str, *, asyncio: Literal[False] = ..., **kwargs: Any) -> Scatterer: ...

    @overload
    def scatterer(self, group: str, *, asyncio: Literal[True], **kwargs: Any) -> AsyncScatterer: ...

    def scatterer(self, group: str, *, asyncio: bool = False, **kwargs: Any) -> Scatterer | AsyncScatterer:
        """A scatterer that asks every member of `group`, with the group's deadline and quorum."""
        spec = self._get("group", self.topology.groups, group)
        for address in spec.members.values():
            ensure_ipc_dir(address)
        kw = self._common(self.topology.options_for(spec), kwargs, ("groups", group))
        kw.setdefault("deadline", spec.deadline)
        kw.setdefault("quorum", spec.quorum)
        kw.setdefault("group", group)
        return self._keep((AsyncScatterer if asyncio else Scatterer)(dict(spec.members), **kw))

    @overload
    def member(self, group: str, member: str, handler: Callable[..., Any], *, asyncio: Literal[False] = ..., **kwargs: Any) -> Replier: ...

    @overload
    def member(self, group: str, member: str, handler: Callable[..., Any], *, asyncio: Literal[True], **kwargs: Any) -> AsyncReplier: ...

    def member(self, group: str, member: str, handler: Callable[..., Any], *, asyncio: bool = False,
               **kwargs: Any) -> Replier | AsyncReplier:
        """The replier for one member of `group`, bound to that member's address."""
        spec = self._get("group", self.topology.groups, group)
        address = self._get(f"member of group {group!r} named", spec.members, member)
        ensure_ipc_dir(address)
        kw = self._common(self.topology.options_for(spec), kwargs, ("groups", group), server=True)
        # Named after its group: the group is what permission rules grant, and what logs show.
        kw.setdefault("name", group)
        kw.setdefault("permissions", self._permissions())
        return self._keep((AsyncReplier if asyncio else Replier)(address, handler, bind=True, **kw))

    # ---- infrastructure in-process (`zfabric up` runs these as processes) ----------------

    def forwarder(self, name: str) -> Forwarder:
        """The forwarder `name`, not started: call start() (a thread) or run()."""
        spec = self._get("forwarder", self.topology.forwarders, name)
        ensure_ipc_dir(spec.xsub)
        ensure_ipc_dir(spec.xpub)
        options = self._secured(self.topology.options_for(spec), ("forwarders", name), server=True)
        return self._keep(Forwarder(spec.xsub, spec.xpub, options=options, context=self._context,
                                    permissions=self._permissions()))

    def sidecar(self, name: str) -> Sidecar:
        """The sidecar `name` with its queues and policies, not started: call start() or run()."""
        config = self._get("sidecar", self.topology.sidecars, name)
        ensure_ipc_dir(config.endpoint)
        Path(config.store).parent.mkdir(parents=True, exist_ok=True)
        options = self._secured(self.topology.options, ("sidecars", name), server=True)
        return self._keep(Sidecar(config=config, options=options, context=self._context, permissions=self._permissions()))

    # ---- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Close (or stop) everything this fabric made, newest first."""
        while self._made:
            obj = self._made.pop()
            (obj.stop if isinstance(obj, (Forwarder, Sidecar)) else obj.close)()

    def __enter__(self) -> Fabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
