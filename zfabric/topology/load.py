"""YAML -> Topology: walks a safely parsed file, builds the model objects and reports every problem with its line.

Every message has the form `key.path: what was expected, got what (file:line)`. The
loader does not stop at the first problem: `zfabric validate` shows them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from .._yaml import Document, dotted, load_file, load_text
from ..endpoint import Endpoint
from ..errors import ConfigError, TopologyError
from ..options import DEFAULT_REQUEST_RETRIES, DEFAULT_REQUEST_TIMEOUT, SocketOptions
from ..security.keys import check_name
from ..security.permissions import Permissions, Rules
from ..sidecar.config import SidecarConfig
from ..sidecar.policy import RetryPolicy
from .model import (
    ForwarderSpec,
    GroupSpec,
    KeyPath,
    QueueSpec,
    SecuritySpec,
    ServiceSpec,
    TopicSpec,
    Topology,
)

T = TypeVar("T")

VERSION = 1
SECTIONS = ["version", "name", "control", "hosts", "defaults", "security", "forwarders", "topics", "queues",
            "sidecars", "services", "groups"]
SECURITY_KEYS = ["curve", "keys", "secrets", "allow", "permissions"]
OPTION_KEYS = [f.name for f in dataclasses.fields(SocketOptions)]
DEFAULT_KEYS = ["transport", "ipc_dir", *OPTION_KEYS, "request_timeout", "request_retries", "deadline", "send_timeout"]
POLICY_KEYS = [f.name for f in dataclasses.fields(RetryPolicy)]
FORWARDER_KEYS = ["xsub", "xpub", "options", "key"]
TOPIC_KEYS = ["forwarder", "publishers", "subscribers"]
QUEUE_KEYS = ["address", "sidecar", "reliable", "bind", "send_timeout", "backlog", "producers", "consumers", "options", "key",
              *POLICY_KEYS]
SIDECAR_KEYS = ["address", "store", "synchronous", "lease_timeout", "dedupe_window", "cache_limit", "key"]
SERVICE_KEYS = ["address", "timeout", "retries", "servers", "clients", "options", "key"]
GROUP_KEYS = ["members", "deadline", "quorum", "clients", "options", "key"]
IPC_PATH_MAX = 107
"""Longest ipc:// path the kernel accepts (sun_path)."""

_FIELD_ERROR = re.compile(r"^([A-Za-z_]\w*)(?:\.([^:\s]+))?: (.*)$", re.S)
_CLASS_PREFIXES = {"RetryPolicy", "SocketOptions", "sidecar"}
_YAML_NAME = {"endpoint": "address"}
"""Model field -> the key a topology file uses for it."""


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Load, validate and wire-check a topology file; TopologyError lists every problem with its line."""
    doc = load_file(path, what="topology")
    return _Reader(doc, Path(path).resolve().parent, Path(path).stem).topology()


def load_topology_text(text: str, source: str = "<string>", base_dir: str | os.PathLike[str] = ".") -> Topology:
    """The same from YAML text (relative store paths resolve against `base_dir`)."""
    return _Reader(load_text(text, source, what="topology"), Path(base_dir).resolve(), Path(source).stem).topology()


class _Reader:
    def __init__(self, doc: Document, base_dir: Path, stem: str) -> None:
        self.doc = doc
        self.base_dir = base_dir
        self.stem = stem
        self.problems: list[tuple[KeyPath, str]] = []
        self.broken: dict[str, set[str]] = {"forwarders": set(), "sidecars": set()}
        self.hosts: dict[str, str] = {}
        self.transport = "tcp"
        self.ipc_dir = ""
        self.part_keys: dict[tuple[str, str], str] = {}
        self.named_sidecars: set[str] = set()
        """Sidecars some queue names, even a queue with problems (so a sidecar is not called unused)."""

    # ---- reporting ----------------------------------------------------------------------

    def problem(self, path: KeyPath, message: str) -> None:
        self.problems.append((path, message))

    def messages(self) -> list[str]:
        ordered = sorted(self.problems, key=lambda p: self.doc.line(p[0]) or 0)
        return [f"{dotted(path) or 'topology'}: {msg} ({self.doc.where(path)})" for path, msg in ordered]

    def mapping(self, path: KeyPath, value: Any, what: str, *, optional: bool = True) -> dict[Any, Any] | None:
        if value is None and optional:
            return {}
        if not isinstance(value, Mapping):
            self.problem(path, f"expected a mapping of {what}, got {_shown(value)}")
            return None
        return dict(value)

    def keys(self, path: KeyPath, data: Mapping[Any, Any], known: list[str]) -> dict[Any, Any]:
        """The known keys of `data`; each unknown one is a problem with a "did you mean"."""
        out = {}
        for key, value in data.items():
            if key in known:
                out[key] = value
                continue
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
            self.problem((*path, key), f"unknown key; {hint}")
        return out

    def build(self, path: KeyPath, data: Mapping[str, Any], make: Callable[[], T]) -> T | None:
        """Call a model constructor; a ConfigError becomes a problem at the key it names."""
        try:
            return make()
        except ConfigError as exc:
            self.problem(*self._locate(path, data, str(exc)))
        except TypeError as exc:
            self.problem(path, str(exc))
        return None

    def _locate(self, path: KeyPath, data: Mapping[str, Any], text: str) -> tuple[KeyPath, str]:
        m = _FIELD_ERROR.match(text)
        if not m:
            return path, text
        head, sub, rest = m.groups()
        if head in _CLASS_PREFIXES:
            head, sub = (sub or ""), None
        key = _YAML_NAME.get(head, head)
        if key in data:
            if sub is not None and isinstance(data[key], Mapping) and sub in data[key]:
                return (*path, key, sub), rest
            return (*path, key), rest
        return path, text

    # ---- values -------------------------------------------------------------------------

    def names(self, path: KeyPath, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(path, f"expected a list of names, got {_shown(value)}")
            return ()
        return tuple(value)

    def address(self, path: KeyPath, raw: Any, auto: str) -> str | None:
        """A full address from `host:port`, `tcp://host:port` (host maybe declared in hosts) or ipc://."""
        if raw is None:
            if self.transport == "ipc":
                return self._ipc_path(path, f"ipc://{self.ipc_dir}/{auto}")
            self.problem(path, "an address is required (host:port, tcp://host:port or ipc://path; "
                               "with defaults.transport: ipc it may be left out)")
            return None
        if not isinstance(raw, str) or not raw.strip():
            self.problem(path, f"expected an address like 'local:5570' or 'tcp://127.0.0.1:5570', got {_shown(raw)}")
            return None
        text = raw.strip()
        if "://" not in text:
            if ":" not in text:
                self.problem(path, f"expected host:port or a full address, got {raw!r}")
                return None
            text = "tcp://" + text
        if text.startswith("tcp://"):
            host, colon, port = text[len("tcp://"):].rpartition(":")
            bare = host.strip("[]")
            if bare in self.hosts:
                value = self.hosts[bare]
                host = f"[{value}]" if ":" in value else value
            elif not _literal_host(bare):
                close = difflib.get_close_matches(bare, list(self.hosts), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else (
                    f"; declared hosts: {', '.join(self.hosts)}" if self.hosts else "; declare it under hosts:")
                self.problem(path, f"host {bare!r} is not declared in hosts{hint}")
                return None
            text = f"tcp://{host}{colon}{port}"
        try:
            Endpoint.parse(text, bind=True)
        except ConfigError as exc:
            self.problem(path, str(exc))
            return None
        return self._ipc_path(path, text) if text.startswith("ipc://") else text

    def _ipc_path(self, path: KeyPath, address: str) -> str | None:
        if len(address) - len("ipc://") > IPC_PATH_MAX:
            self.problem(path, f"ipc path {address!r} is longer than the {IPC_PATH_MAX} characters a socket path "
                               "may have; use a shorter defaults.ipc_dir")
            return None
        return address

    def options(self, path: KeyPath, raw: Any, base: SocketOptions) -> SocketOptions | None:
        data = self.mapping(path, raw, "socket options")
        if not data:
            return None
        data = self.keys(path, data, OPTION_KEYS)
        return self.build(path, data, lambda: base.replace(**data))

    # ---- sections -----------------------------------------------------------------------

    def topology(self) -> Topology:
        root = self.mapping((), self.doc.data, "sections", optional=False)
        if root is None:
            raise TopologyError(self.messages(), self.doc.source)
        root = self.keys((), root, SECTIONS)
        version = root.get("version", VERSION)
        if version != VERSION:
            self.problem(("version",), f"this zfabric reads topology version {VERSION}, got {_shown(version)}")
        name = root.get("name", self.stem)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            self.problem(("name",), f"expected a name of letters, digits, '.', '_' or '-', got {_shown(name)}")
            name = self.stem
        self.read_hosts(root.get("hosts"))
        base, extra = self.read_defaults(root.get("defaults"), name)
        security = self.read_security(root.get("security"))
        forwarders = self.section(root, "forwarders", FORWARDER_KEYS, lambda p, n, d: self.forwarder(p, n, d, base))
        queues, policies = self.queues(root.get("queues"), base, extra)
        sidecars = self.section(root, "sidecars", SIDECAR_KEYS, lambda p, n, d: self.sidecar(p, n, d, policies))
        services = self.section(root, "services", SERVICE_KEYS, lambda p, n, d: self.service(p, n, d, base, extra))
        groups = self.section(root, "groups", GROUP_KEYS, lambda p, n, d: self.group(p, n, d, base, extra))
        topics = self.section(root, "topics", TOPIC_KEYS, lambda p, n, d: self.topic(p, n, d, forwarders), allow_null=True)
        control = None
        if root.get("control") is not None:
            control = self.address(("control",), root["control"], "control")
        topology = Topology(name=name, forwarders=forwarders, topics=topics, queues=queues, sidecars=sidecars,
                            services=services, groups=groups, options=base, hosts=dict(self.hosts),
                            control=control or default_control(name, self.ipc_dir), source=self.doc.source,
                            security=security)
        if security is None:
            for section, part in self.part_keys:
                self.problem((section, part, "key"), "a part's key applies only with a security section")
        for problem in topology.problems():
            if not self._caused_by_broken(problem.path, topology):
                self.problem(problem.path, problem.message)
        if self.problems:
            raise TopologyError(self.messages(), self.doc.source)
        return topology

    def _caused_by_broken(self, path: KeyPath, topology: Topology) -> bool:
        if path[:1] == ("topics",) and path[-1:] == ("forwarder",):
            return topology.topics[str(path[1])].forwarder in self.broken["forwarders"]
        if path[:1] == ("queues",) and path[-1:] == ("sidecar",):
            return topology.queues[str(path[1])].sidecar in self.broken["sidecars"]
        return False

    def section(self, root: Mapping[str, Any], key: str, known: list[str],
                make: Callable[[KeyPath, str, dict[str, Any]], T | None], allow_null: bool = False) -> dict[str, T]:
        data = self.mapping((key,), root.get(key), key)
        out: dict[str, T] = {}
        for name, raw in (data or {}).items():
            path = (key, name)
            if not isinstance(name, str) or not name:
                self.problem(path, f"names must be non-empty strings, got {_shown(name)}")
                continue
            entry = self.mapping(path, raw, "settings", optional=allow_null)
            if entry is None:
                self.broken.get(key, set()).add(name)
                continue
            entry = self.keys(path, entry, known)
            if "key" in entry:
                self.part_key(key, name, entry.pop("key"))
            built = make(path, name, entry)
            if built is None:
                self.broken.get(key, set()).add(name)
            else:
                out[name] = built
        return out

    def part_key(self, section: str, name: str, value: Any) -> None:
        path = (section, name, "key")
        try:
            self.part_keys[(section, name)] = check_name(value)
        except ConfigError as exc:
            self.problem(path, str(exc))

    def read_security(self, raw: Any) -> SecuritySpec | None:
        if raw is None:
            return None
        path = ("security",)
        data = self.mapping(path, raw, "security settings")
        if data is None:
            return None
        data = self.keys(path, data, SECURITY_KEYS)
        curve = data.get("curve", True)
        if not isinstance(curve, bool):
            self.problem((*path, "curve"), f"expected true or false, got {_shown(curve)}")
            return None
        if not curve:
            return None
        paths = {}
        for key in ("keys", "secrets"):
            value = data.get(key, data.get("keys"))
            if not isinstance(value, str) or not value:
                self.problem((*path, key), f"expected a directory of key files, got {_shown(value)}")
                return None
            paths[key] = Path(value) if os.path.isabs(value) else self.base_dir / value
        allow = None
        if "allow" in data:
            allow = self.names((*path, "allow"), data["allow"])
            for i, name in enumerate(allow):
                if not (paths["keys"] / f"{name}.key").exists():
                    self.problem((*path, "allow", i), f"no public key {paths['keys'] / (name + '.key')} for {name!r}")
        permissions = None
        rules_data = self.mapping((*path, "permissions"), data.get("permissions"), "key names to rules")
        if rules_data:
            rules = {}
            for name, rule in rules_data.items():
                rule_path = (*path, "permissions", name)
                rule_map = self.mapping(rule_path, rule, "publish, subscribe, queues and services")
                if rule_map is not None:
                    built = self.build(rule_path, rule_map, partial(Rules.from_mapping, rule_map))
                    if built is not None:
                        rules[str(name)] = built
            permissions = Permissions(rules)
        return SecuritySpec(keys=paths["keys"], secrets=paths["secrets"], allow=allow, permissions=permissions,
                            part_keys=self.part_keys)

    def read_hosts(self, raw: Any) -> None:
        data = self.mapping(("hosts",), raw, "host names to addresses") or {}
        for name, value in data.items():
            if not isinstance(value, str) or not value or any(c in value for c in "/ ") or not _literal_host(value):
                self.problem(("hosts", name), f"expected an IP address or DNS name, got {_shown(value)}")
            elif not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][\w-]*", name):
                self.problem(("hosts", name), "host names are letters, digits, '_' and '-', starting with a letter")
            else:
                self.hosts[name] = value

    def read_defaults(self, raw: Any, name: str) -> tuple[SocketOptions, dict[str, Any]]:
        path = ("defaults",)
        data = self.keys(path, self.mapping(path, raw, "defaults") or {}, DEFAULT_KEYS)
        transport = data.get("transport", "tcp")
        if transport not in ("tcp", "ipc"):
            self.problem((*path, "transport"), f"expected 'tcp' or 'ipc', got {_shown(transport)}")
        else:
            self.transport = transport
        ipc_dir = data.get("ipc_dir", os.path.join(tempfile.gettempdir(), f"zfabric-{name}"))
        if not isinstance(ipc_dir, str) or not ipc_dir:
            self.problem((*path, "ipc_dir"), f"expected a directory path, got {_shown(ipc_dir)}")
        else:
            self.ipc_dir = ipc_dir if os.path.isabs(ipc_dir) else str(self.base_dir / ipc_dir)
        options = {k: v for k, v in data.items() if k in OPTION_KEYS}
        base = self.build(path, options, lambda: SocketOptions(**options)) or SocketOptions()
        extra = {"request_timeout": data.get("request_timeout", DEFAULT_REQUEST_TIMEOUT),
                 "request_retries": data.get("request_retries", DEFAULT_REQUEST_RETRIES),
                 "deadline": data.get("deadline", 1.0), "send_timeout": data.get("send_timeout")}
        return base, extra

    def forwarder(self, path: KeyPath, name: str, data: dict[str, Any], base: SocketOptions) -> ForwarderSpec | None:
        xsub = self.address((*path, "xsub"), data.get("xsub"), f"forwarder-{name}-xsub")
        xpub = self.address((*path, "xpub"), data.get("xpub"), f"forwarder-{name}-xpub")
        options = self.options((*path, "options"), data.get("options"), base)
        if xsub is None or xpub is None:
            return None
        return self.build(path, data, lambda: ForwarderSpec(xsub, xpub, options))

    def topic(self, path: KeyPath, name: str, data: dict[str, Any], forwarders: dict[str, ForwarderSpec]) -> TopicSpec | None:
        forwarder = data.get("forwarder")
        if forwarder is None:
            declared = list(forwarders) + sorted(self.broken["forwarders"])
            if len(declared) != 1:
                self.problem(path, f"forwarder: required when {len(declared)} forwarders are declared")
                return None
            forwarder = declared[0]
        if not isinstance(forwarder, str):
            self.problem((*path, "forwarder"), f"expected a forwarder name, got {_shown(forwarder)}")
            return None
        return self.build(path, data, lambda: TopicSpec(forwarder, self.names((*path, "publishers"), data.get("publishers")),
                                                        self.names((*path, "subscribers"), data.get("subscribers"))))

    def queues(self, raw: Any, base: SocketOptions, extra: dict[str, Any]
               ) -> tuple[dict[str, QueueSpec], dict[str, dict[str, RetryPolicy]]]:
        policies: dict[str, dict[str, RetryPolicy]] = {}

        def make(path: KeyPath, name: str, data: dict[str, Any]) -> QueueSpec | None:
            sidecar = data.get("sidecar")
            if isinstance(sidecar, str):
                self.named_sidecars.add(sidecar)
            reliable = data.get("reliable", sidecar is not None)
            if not isinstance(reliable, bool):
                self.problem((*path, "reliable"), f"expected true or false, got {_shown(reliable)}")
                return None
            policy_data = {k: v for k, v in data.items() if k in POLICY_KEYS}
            if reliable:
                if sidecar is None:
                    self.problem(path, "a reliable queue needs a sidecar: name the sidecar that stores it")
                    return None
                if not isinstance(sidecar, str):
                    self.problem((*path, "sidecar"), f"expected a sidecar name, got {_shown(sidecar)}")
                    return None
                for key in ("address", "bind", "send_timeout", "backlog"):
                    if key in data:
                        self.problem((*path, key), "applies only to plain queues; producers and workers of a reliable "
                                                   "queue connect to its sidecar's address")
                policy = self.build(path, policy_data, lambda: RetryPolicy(**policy_data))
                if policy is None:
                    return None
                policies.setdefault(sidecar, {})[name] = policy
                options = self.options((*path, "options"), data.get("options"), base)
                return self.build(path, data, lambda: QueueSpec(sidecar=sidecar, options=options,
                                                                producers=self.names((*path, "producers"), data.get("producers")),
                                                                consumers=self.names((*path, "consumers"), data.get("consumers"))))
            if sidecar is not None:
                self.problem((*path, "sidecar"), "reliable: false queues have no sidecar")
                return None
            for key in policy_data:
                self.problem((*path, key), "a retry policy applies only to reliable queues (add sidecar: NAME)")
            address = self.address((*path, "address"), data.get("address"), f"queue-{name}")
            options = self.options((*path, "options"), data.get("options"), base)
            if address is None:
                return None
            return self.build(path, data, lambda: QueueSpec(
                address=address, bind=data.get("bind", "consumer"), send_timeout=data.get("send_timeout", extra["send_timeout"]),
                backlog=data.get("backlog"),
                producers=self.names((*path, "producers"), data.get("producers")),
                consumers=self.names((*path, "consumers"), data.get("consumers")), options=options))

        return self.section({"queues": raw}, "queues", QUEUE_KEYS, make), policies

    def sidecar(self, path: KeyPath, name: str, data: dict[str, Any],
                policies: dict[str, dict[str, RetryPolicy]]) -> SidecarConfig | None:
        address = self.address((*path, "address"), data.get("address"), f"sidecar-{name}")
        owned = policies.get(name, {})
        if not owned and name not in self.named_sidecars:
            self.problem(path, "no reliable queue uses this sidecar (give a queue sidecar: " + name + ")")
            return None
        store = data.get("store")
        if store is None:
            self.problem(path, "store: required (the SQLite file that keeps this sidecar's messages)")
            return None
        if not isinstance(store, str) or not store:
            self.problem((*path, "store"), f"expected a file path, got {_shown(store)}")
            return None
        if address is None:
            return None
        settings = {k: data[k] for k in ("synchronous", "lease_timeout", "dedupe_window", "cache_limit") if k in data}
        store_path = store if os.path.isabs(store) else str(self.base_dir / store)
        # A sidecar whose queues all have problems is still checked, with a stand-in queue.
        built = self.build(path, data, lambda: SidecarConfig(store=store_path, queues=owned or ["-"], endpoint=address,
                                                             **settings))
        return built if owned else None

    def service(self, path: KeyPath, name: str, data: dict[str, Any], base: SocketOptions,
                extra: dict[str, Any]) -> ServiceSpec | None:
        address = self.address((*path, "address"), data.get("address"), f"service-{name}")
        options = self.options((*path, "options"), data.get("options"), base)
        if address is None:
            return None
        return self.build(path, data, lambda: ServiceSpec(
            address, timeout=data.get("timeout", extra["request_timeout"]), retries=data.get("retries", extra["request_retries"]),
            servers=self.names((*path, "servers"), data.get("servers")),
            clients=self.names((*path, "clients"), data.get("clients")), options=options))

    def group(self, path: KeyPath, name: str, data: dict[str, Any], base: SocketOptions,
              extra: dict[str, Any]) -> GroupSpec | None:
        raw_members = data.get("members")
        members_path = (*path, "members")
        if isinstance(raw_members, list) and self.transport == "ipc" and all(isinstance(m, str) for m in raw_members):
            raw_members = {m: None for m in raw_members}
        if not isinstance(raw_members, Mapping) or not raw_members:
            self.problem(members_path, f"expected a mapping of member names to addresses, got {_shown(raw_members)}")
            return None
        members = {}
        for member, raw in raw_members.items():
            address = self.address((*members_path, member), raw, f"group-{name}-{member}")
            if address is not None:
                members[str(member)] = address
        options = self.options((*path, "options"), data.get("options"), base)
        if len(members) != len(raw_members):
            return None
        return self.build(path, data, lambda: GroupSpec(members, deadline=data.get("deadline", extra["deadline"]),
                                                        quorum=data.get("quorum"),
                                                        clients=self.names((*path, "clients"), data.get("clients")),
                                                        options=options))


def default_control(name: str, ipc_dir: str | None = None) -> str:
    """Where `zfabric up` for topology `name` answers status requests when the file names no `control`."""
    return f"ipc://{ipc_dir or os.path.join(tempfile.gettempdir(), f'zfabric-{name}')}/control"


def _literal_host(host: str) -> bool:
    """An IP, `localhost`, `*`, or a dotted DNS name: a host that needs no declaration."""
    if host in ("*", "localhost") or "." in host and not host.replace(".", "").isdigit() and re.fullmatch(r"[\w.-]+", host):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _shown(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return repr(value)
