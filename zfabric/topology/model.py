"""The topology model: what a fabric is made of, as objects code builds directly or the YAML loader builds.

Each part holds resolved, validated values (full addresses, `SocketOptions`, `SidecarConfig`
with its `RetryPolicy` per queue), so a topology written in YAML and one written in Python
are the same objects and pass the same checks. `Topology.problems()` checks the wiring
between parts: names that point nowhere, two parts binding one address, a consumer with
no producer.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..endpoint import Endpoint, tcp_host_port
from ..errors import ConfigError, TopologyError
from ..options import (
    DEFAULT_OPTIONS,
    DEFAULT_REQUEST_RETRIES,
    DEFAULT_REQUEST_TIMEOUT,
    SocketOptions,
)
from ..security.keys import KeyPair, find
from ..security.permissions import Permissions
from ..sidecar.config import SidecarConfig

KeyPath = tuple[Hashable, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a topology: where (a key path) and what."""

    path: KeyPath
    message: str


def _address(value: str, what: str) -> str:
    return Endpoint.parse(value, bind=True).address if value else _fail(f"{what}: an address is required")


def _fail(message: str) -> str:
    raise ConfigError(message)


def _names(value: tuple[str, ...] | list[str], what: str) -> tuple[str, ...]:
    items = tuple(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{what}: expected a list of names, got {item!r}")
    return items


@dataclass(frozen=True)
class ForwarderSpec:
    """A pub/sub forwarder: publishers connect to `xsub`, subscribers to `xpub`; it binds both."""

    xsub: str
    xpub: str
    options: SocketOptions | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "xsub", _address(self.xsub, "xsub"))
        object.__setattr__(self, "xpub", _address(self.xpub, "xpub"))


@dataclass(frozen=True)
class TopicSpec:
    """A topic (a prefix) carried by one forwarder; the app names say who publishes and who subscribes."""

    forwarder: str
    publishers: tuple[str, ...] = ()
    subscribers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "publishers", _names(self.publishers, "publishers"))
        object.__setattr__(self, "subscribers", _names(self.subscribers, "subscribers"))


@dataclass(frozen=True)
class QueueSpec:
    """A point-to-point queue: plain (PUSH -> PULL at `address`) or reliable (through the sidecar `sidecar`)."""

    address: str | None = None
    """Plain queues: the address one side binds."""
    sidecar: str | None = None
    """Reliable queues: the sidecar that owns this queue (its policy is in that sidecar's config)."""
    bind: Literal["consumer", "producer"] = "consumer"
    """Plain queues: which side binds `address` (several consumer processes need `producer`)."""
    send_timeout: float | None = None
    """Plain queues: seconds a send may block on a full queue before SendTimeout (None: forever)."""
    backlog: int | None = None
    """Plain queues: messages a producer's backlog holds at most (None: the library's default; 0: no backlog)."""
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    options: SocketOptions | None = None

    def __post_init__(self) -> None:
        if (self.address is None) == (self.sidecar is None):
            raise ConfigError("a queue needs either an address (plain) or a sidecar (reliable), not both")
        if self.address is not None:
            object.__setattr__(self, "address", _address(self.address, "address"))
        if self.bind not in ("consumer", "producer"):
            raise ConfigError(f"bind: expected 'consumer' or 'producer', got {self.bind!r}")
        if self.send_timeout is not None and (isinstance(self.send_timeout, bool)
                                              or not isinstance(self.send_timeout, (int, float)) or self.send_timeout <= 0):
            raise ConfigError(f"send_timeout: expected a positive number of seconds or null, got {self.send_timeout!r}")
        if self.backlog is not None and (type(self.backlog) is not int or self.backlog < 0):
            raise ConfigError(f"backlog: expected a number of messages, 0 or more, or null, got {self.backlog!r}")
        object.__setattr__(self, "producers", _names(self.producers, "producers"))
        object.__setattr__(self, "consumers", _names(self.consumers, "consumers"))

    @property
    def reliable(self) -> bool:
        return self.sidecar is not None


def _seconds(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{what}: expected a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class ServiceSpec:
    """A request-reply service: its replier binds `address`, requesters connect to it."""

    address: str
    timeout: float = DEFAULT_REQUEST_TIMEOUT
    retries: int = DEFAULT_REQUEST_RETRIES
    servers: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    options: SocketOptions | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", _address(self.address, "address"))
        _seconds(self.timeout, "timeout")
        if type(self.retries) is not int or self.retries < 0:
            raise ConfigError(f"retries: expected an integer >= 0, got {self.retries!r}")
        object.__setattr__(self, "servers", _names(self.servers, "servers"))
        object.__setattr__(self, "clients", _names(self.clients, "clients"))


@dataclass(frozen=True)
class GroupSpec:
    """A scatter-gather group: each member binds its address; a scatterer asks them all."""

    members: Mapping[str, str]
    deadline: float = 1.0
    quorum: int | None = None
    clients: tuple[str, ...] = ()
    options: SocketOptions | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.members, Mapping) or not self.members:
            raise ConfigError("members: a group needs at least one member (name: address)")
        object.__setattr__(self, "members", {str(n): _address(a, f"members.{n}") for n, a in self.members.items()})
        _seconds(self.deadline, "deadline")
        if self.quorum is not None:
            if type(self.quorum) is not int or self.quorum < 1:
                raise ConfigError(f"quorum: expected a positive integer or null, got {self.quorum!r}")
            if self.quorum > len(self.members):
                raise ConfigError(f"quorum: {self.quorum} is larger than the group's {len(self.members)} member(s)")
        object.__setattr__(self, "clients", _names(self.clients, "clients"))


@dataclass(frozen=True)
class SecuritySpec:
    """CURVE for the whole fabric: where keys are, who may connect, what each key may do.

    Every part that binds (forwarder, sidecar, plain queue, service, group) is a CURVE
    server with its own key pair, named `part_keys[(section, name)]` or else the part's name
    (a group's members share the group's key). Clients prove their own key (the identity a
    service gives `Fabric`) and check the server's.
    """

    keys: Path
    """Directory of public keys (NAME.key) of every part and client; the default allowlist."""
    secrets: Path
    """Directory of this machine's secret keys (NAME.key_secret); $ZFABRIC_SECRETS overrides it."""
    allow: tuple[str, ...] | None = None
    """Only these key names may connect (None: every key in `keys`, re-read when it changes)."""
    permissions: Permissions | None = None
    """Per-key topic rules the forwarders enforce (None: any allowed key may publish and subscribe)."""
    part_keys: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def key_of(self, section: str, name: str) -> str:
        """The key name a part binds with."""
        return self.part_keys.get((section, name), name)

    def public_key(self, name: str) -> KeyPair:
        return find(self.keys, name, secret=False)

    def secret_key(self, name: str) -> KeyPair:
        return find(Path(os.environ.get("ZFABRIC_SECRETS") or self.secrets), name, secret=True)


@dataclass(frozen=True)
class Binding:
    """One address some part of the topology binds, and which part (for the duplicate check)."""

    address: str
    path: KeyPath
    what: str


@dataclass(frozen=True)
class Topology:
    """A whole fabric: its parts by name, the fabric-wide socket options and the hosts it spans."""

    name: str = "fabric"
    forwarders: Mapping[str, ForwarderSpec] = field(default_factory=dict)
    topics: Mapping[str, TopicSpec] = field(default_factory=dict)
    queues: Mapping[str, QueueSpec] = field(default_factory=dict)
    sidecars: Mapping[str, SidecarConfig] = field(default_factory=dict)
    services: Mapping[str, ServiceSpec] = field(default_factory=dict)
    groups: Mapping[str, GroupSpec] = field(default_factory=dict)
    options: SocketOptions = DEFAULT_OPTIONS
    hosts: Mapping[str, str] = field(default_factory=dict)
    """Host names declared once (name -> IP or DNS name); addresses were resolved through them."""
    control: str | None = None
    """Where `zfabric up` answers `zfabric status` (None: an ipc path derived from the name)."""
    source: str = "<code>"
    """The file this topology came from, for messages."""
    security: SecuritySpec | None = None
    """CURVE for every socket of the fabric (None: plain TCP)."""

    def options_for(self, spec: ForwarderSpec | QueueSpec | ServiceSpec | GroupSpec) -> SocketOptions:
        """The socket options a part runs with: its own, else the fabric's."""
        return spec.options if spec.options is not None else self.options

    def host_of(self, address: str) -> str | None:
        """The declared host name an address is on, if it was written with one."""
        parts = tcp_host_port(address)
        if parts is None:
            return None
        for name, value in self.hosts.items():
            if value == parts[0]:
                return name
        return None

    def bindings(self) -> Iterator[Binding]:
        """Every address something in this topology binds."""
        for name, fwd in self.forwarders.items():
            yield Binding(fwd.xsub, ("forwarders", name, "xsub"), f"forwarder {name} (xsub)")
            yield Binding(fwd.xpub, ("forwarders", name, "xpub"), f"forwarder {name} (xpub)")
        for name, sc in self.sidecars.items():
            yield Binding(sc.endpoint, ("sidecars", name, "address"), f"sidecar {name}")
        for name, q in self.queues.items():
            if q.address is not None:
                yield Binding(q.address, ("queues", name, "address"), f"queue {name} ({q.bind})")
        for name, s in self.services.items():
            yield Binding(s.address, ("services", name, "address"), f"service {name}")
        for name, g in self.groups.items():
            for member, address in g.members.items():
                yield Binding(address, ("groups", name, "members", member), f"group {name} member {member}")

    def problems(self) -> list[Problem]:
        """Everything wrong with the wiring (an empty list when the topology is usable)."""
        out: list[Problem] = self._security_problems()
        out += _clashes(list(self.bindings()))
        for name, topic in self.topics.items():
            if topic.forwarder not in self.forwarders:
                out.append(Problem(("topics", name, "forwarder"), _unknown("forwarder", topic.forwarder, self.forwarders)))
            if topic.subscribers and not topic.publishers:
                out.append(Problem(("topics", name, "subscribers"),
                                   f"subscribers {', '.join(topic.subscribers)} but no publishers"))
        owners: dict[str, str] = {}
        for sc_name, sc in self.sidecars.items():
            for queue in sc.policies:
                owners.setdefault(queue, sc_name)
                if queue not in self.queues or self.queues[queue].sidecar != sc_name:
                    out.append(Problem(("sidecars", sc_name), f"owns queue {queue!r}, which is not a reliable queue "
                                       f"declared with sidecar {sc_name!r}"))
        for name, q in self.queues.items():
            path = ("queues", name)
            if q.sidecar is not None:
                if q.sidecar not in self.sidecars:
                    out.append(Problem((*path, "sidecar"), _unknown("sidecar", q.sidecar, self.sidecars)))
                elif name not in self.sidecars[q.sidecar].policies:
                    out.append(Problem((*path, "sidecar"), f"sidecar {q.sidecar!r} does not list this queue"))
            elif q.bind == "consumer" and len(q.consumers) > 1:
                out.append(Problem((*path, "consumers"), f"{len(q.consumers)} consumers ({', '.join(q.consumers)}) cannot "
                                   "all bind one address; set bind: producer so the producer binds and consumers connect"))
            elif q.bind == "producer" and len(q.producers) > 1:
                out.append(Problem((*path, "producers"), f"{len(q.producers)} producers cannot all bind one address; "
                                   "set bind: consumer"))
            if q.consumers and not q.producers:
                out.append(Problem((*path, "consumers"), f"consumers {', '.join(q.consumers)} but no producers"))
            if q.producers and not q.consumers:
                out.append(Problem((*path, "producers"), f"producers {', '.join(q.producers)} but no consumers"))
        for name, s in self.services.items():
            if s.clients and not s.servers:
                out.append(Problem(("services", name, "clients"), f"clients {', '.join(s.clients)} but no servers"))
            if len(s.servers) > 1:
                out.append(Problem(("services", name, "servers"), f"{len(s.servers)} servers cannot all bind one "
                                   "address; declare one service per server address"))
        return out

    def binding_parts(self) -> Iterator[tuple[str, str, KeyPath]]:
        """(section, name, key path) of every part that binds an address, i.e. holds a server key."""
        for section in ("forwarders", "sidecars", "services", "groups"):
            for name in getattr(self, section):
                yield section, name, (section, name)
        for name, q in self.queues.items():
            if q.address is not None:
                yield "queues", name, ("queues", name)

    def _security_problems(self) -> list[Problem]:
        sec = self.security
        if sec is None:
            return []
        out: list[Problem] = []
        if not sec.keys.is_dir():
            return [Problem(("security", "keys"), f"{sec.keys} is not a directory of public keys "
                            "(make one with: zfabric keys generate NAME --dir DIR)")]
        for section, name, path in self.binding_parts():
            key = sec.key_of(section, name)
            if not (sec.keys / f"{key}.key").exists():
                out.append(Problem((*path, "key"), f"no public key {sec.keys / (key + '.key')}; create it with: "
                                   f"zfabric keys generate {key} --dir {sec.keys}"))
        return out

    def check(self) -> Topology:
        """Raise TopologyError listing every problem; returns self when there are none."""
        problems = self.problems()
        if problems:
            raise TopologyError([f"{_dotted(p.path)}: {p.message}" for p in problems], self.source)
        return self


def _dotted(path: KeyPath) -> str:
    from .._yaml import dotted

    return dotted(path)


def _unknown(kind: str, name: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif known:
        hint = f"declared: {', '.join(known)}"
    else:
        hint = f"no {kind}s are declared"
    return f"{name!r} is not a declared {kind}; {hint}"


def _is_wildcard(host: str) -> bool:
    if host == "*":
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _same_place(a: str, b: str) -> bool:
    ka, kb = tcp_host_port(a), tcp_host_port(b)
    if ka is None or kb is None:
        return a == b
    if ka[1] != kb[1] or ka[1] in ("0", "*"):
        return False
    return ka[0] == kb[0] or _is_wildcard(ka[0]) or _is_wildcard(kb[0])


def _clashes(bindings: list[Binding]) -> list[Problem]:
    out = []
    for i, later in enumerate(bindings):
        for earlier in bindings[:i]:
            if _same_place(earlier.address, later.address):
                out.append(Problem(later.path, f"{later.address} is already bound by {earlier.what} "
                                   f"({_dotted(earlier.path)}); two parts cannot bind one address"))
                break
    return out
