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
from ..patterns.forwarder import Forwarder
from ..patterns.pubsub import AsyncPublisher, AsyncSubscriber, Publisher, Subscriber
from ..patterns.queue import AsyncConsumer, AsyncProducer, Consumer, Producer
from ..patterns.reliable import AsyncReliableProducer, ReliableProducer
from ..patterns.reqrep import AsyncReplier, AsyncRequester, Replier, Requester
from ..patterns.scatter import AsyncScatterer, Scatterer
from ..patterns.worker import AsyncWorker, Worker
from ..sidecar.service import Sidecar
from .load import load_topology
from .model import Topology

ENV_VAR = "ZFABRIC_TOPOLOGY"
"""Environment variable naming the topology file when `from_topology()` gets no path."""

T = TypeVar("T")


def ensure_ipc_dir(address: str) -> None:
    """Create the directory of an ipc:// address, so binding to it works on a fresh machine."""
    if address.startswith("ipc://"):
        Path(address[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)


class Fabric:
    """The parts of one topology by name, sync or asyncio (`asyncio=True`); extra keywords go to the constructor."""

    def __init__(self, topology: Topology, *, context: Any = None) -> None:
        self.topology = topology
        self._context = context
        self._made: list[Any] = []

    @classmethod
    def from_topology(cls, path: str | os.PathLike[str] | None = None, *, context: Any = None) -> Fabric:
        """Load `path` (default: the file named by $ZFABRIC_TOPOLOGY); TopologyError lists any problems."""
        if path is None:
            path = os.environ.get(ENV_VAR)
            if not path:
                raise ConfigError(f"no topology file given and ${ENV_VAR} is not set")
        return cls(load_topology(path), context=context)

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

    def _common(self, options: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs.setdefault("options", options)
        if self._context is not None:
            kwargs.setdefault("context", self._context)
        return kwargs

    # ---- queues -------------------------------------------------------------------------

    @overload
    def producer(self, queue: str, *, asyncio: Literal[False] = ..., **kwargs: Any) -> Producer | ReliableProducer: ...

    @overload
    def producer(self, queue: str, *, asyncio: Literal[True], **kwargs: Any) -> AsyncProducer | AsyncReliableProducer: ...

    def producer(self, queue: str, *, asyncio: bool = False, **kwargs: Any) -> Producer | ReliableProducer | AsyncProducer | AsyncReliableProducer:
        """A producer for `queue`: ReliableProducer (to its sidecar) or Producer (plain), sync or asyncio."""
        spec = self._get("queue", self.topology.queues, queue)
        kw = self._common(self.topology.options_for(spec), kwargs)
        if spec.sidecar is not None:
            endpoint = self._get("sidecar", self.topology.sidecars, spec.sidecar).endpoint
            return self._keep((AsyncReliableProducer if asyncio else ReliableProducer)(endpoint, queue, **kw))
        assert spec.address is not None
        ensure_ipc_dir(spec.address)
        kw.setdefault("send_timeout", spec.send_timeout)
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
        kw = self._common(self.topology.options_for(spec), kwargs)
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
        kw = self._common(self.topology.options_for(spec), kwargs)
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
        _, fwd = self._forwarder_of(topic)
        kw = self._common(self.topology.options_for(fwd), kwargs)
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
        fwd = self.topology.forwarders[forwarders.pop()]
        kw = self._common(self.topology.options_for(fwd), kwargs)
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
        kw = self._common(self.topology.options_for(spec), kwargs)
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
        kw = self._common(self.topology.options_for(spec), kwargs)
        kw.setdefault("name", service)
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
        kw = self._common(self.topology.options_for(spec), kwargs)
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
        kw = self._common(self.topology.options_for(spec), kwargs)
        kw.setdefault("name", member)
        return self._keep((AsyncReplier if asyncio else Replier)(address, handler, bind=True, **kw))

    # ---- infrastructure in-process (`zfabric up` runs these as processes) ----------------

    def forwarder(self, name: str) -> Forwarder:
        """The forwarder `name`, not started: call start() (a thread) or run()."""
        spec = self._get("forwarder", self.topology.forwarders, name)
        ensure_ipc_dir(spec.xsub)
        ensure_ipc_dir(spec.xpub)
        return self._keep(Forwarder(spec.xsub, spec.xpub, options=self.topology.options_for(spec), context=self._context))

    def sidecar(self, name: str) -> Sidecar:
        """The sidecar `name` with its queues and policies, not started: call start() or run()."""
        config = self._get("sidecar", self.topology.sidecars, name)
        ensure_ipc_dir(config.endpoint)
        Path(config.store).parent.mkdir(parents=True, exist_ok=True)
        return self._keep(Sidecar(config=config, options=self.topology.options, context=self._context))

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
