"""`zfabric graph`: a topology as a Mermaid flowchart, so docs and reviewers can see the wiring.

Apps (the names in producers, consumers, publishers, ...) are rounded boxes; queues are
cylinders, forwarders hexagons, sidecars stadiums, services rectangles, groups
subroutines. Arrows point the way messages flow; request-reply arrows point at the server.
"""

from __future__ import annotations

import re
from pathlib import Path

from .model import Topology


class _Ids:
    """Mermaid node ids: letters, digits and underscores, unique per (kind, name)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], str] = {}

    def __call__(self, kind: str, name: str) -> str:
        key = (kind, name)
        if key not in self._ids:
            base = f"{kind}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"
            candidate, n = base, 1
            while candidate in self._ids.values():
                n += 1
                candidate = f"{base}_{n}"
            self._ids[key] = candidate
        return self._ids[key]


def _label(lines: tuple[str, ...]) -> str:
    """A quoted Mermaid label; each line escaped, joined with line breaks."""
    return '"' + "<br/>".join(t.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;") for t in lines) + '"'


def mermaid(topology: Topology, *, addresses: bool = True) -> str:
    """The flowchart text (starts with `flowchart LR`); `addresses` adds each part's address to its label."""
    ids = _Ids()
    lines = ["flowchart LR"]
    edges: list[str] = []

    def node(kind: str, name: str, shape: tuple[str, str], *label: str) -> str:
        node_id = ids(kind, name)
        lines.append(f"    {node_id}{shape[0]}{_label(label)}{shape[1]}")
        return node_id

    def detail(*text: str) -> tuple[str, ...]:
        return text if addresses else ()

    def app(name: str) -> str:
        return ids("app", name)

    apps: list[str] = []
    for name, fwd in topology.forwarders.items():
        node("fwd", name, ("{{", "}}"), f"forwarder {name}", *detail(f"xsub {fwd.xsub}", f"xpub {fwd.xpub}"))
    for name, sc in topology.sidecars.items():
        node("sidecar", name, ("([", "])"), f"sidecar {name}", *detail(sc.endpoint, f"store {Path(sc.store).name}"))
    for name, topic in topology.topics.items():
        t = node("topic", name, (">", "]"), f"topic {name}")
        edges.append(f"    {t} -.- {ids('fwd', topic.forwarder)}")
        edges += [f"    {app(a)} -->|publish| {t}" for a in topic.publishers]
        edges += [f"    {t} --> {app(a)}" for a in topic.subscribers]
        apps += [*topic.publishers, *topic.subscribers]
    for name, q in topology.queues.items():
        if q.sidecar is not None:
            policy = topology.sidecars[q.sidecar].policies.get(name) if q.sidecar in topology.sidecars else None
            extra = (f"max attempts {policy.max_attempts}",) if policy is not None else ()
            qn = node("queue", name, ("[(", ")]"), f"reliable queue {name}", *extra)
            edges.append(f"    {qn} -.- {ids('sidecar', q.sidecar)}")
        else:
            qn = node("queue", name, ("[(", ")]"), f"queue {name}", *detail(f"{q.address} ({q.bind} binds)"))
        edges += [f"    {app(a)} --> {qn}" for a in q.producers]
        edges += [f"    {qn} --> {app(a)}" for a in q.consumers]
        apps += [*q.producers, *q.consumers]
    for name, s in topology.services.items():
        sn = node("service", name, ("[", "]"), f"service {name}", *detail(s.address))
        edges += [f"    {app(a)} -->|request| {sn}" for a in s.clients]
        edges += [f"    {sn} -.->|served by| {app(a)}" for a in s.servers]
        apps += [*s.clients, *s.servers]
    for name, g in topology.groups.items():
        quorum = f", quorum {g.quorum}" if g.quorum is not None else ""
        gn = node("group", name, ("[[", "]]"), f"group {name}", f"deadline {g.deadline:g} s{quorum}")
        edges += [f"    {app(a)} -->|scatter| {gn}" for a in g.clients]
        for member, address in g.members.items():
            m = node("member", f"{name}.{member}", ("(", ")"), member, *detail(address))
            edges.append(f"    {gn} --> {m}")
        apps += list(g.clients)
    for name in dict.fromkeys(apps):
        node("app", name, ("(", ")"), name)
    return "\n".join(lines + edges) + "\n"
