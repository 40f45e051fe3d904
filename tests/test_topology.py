"""Topologies: loading, every class of validation error (with key path and line), one model for YAML and code,
`Fabric` lookups over real sockets, and the Mermaid graph."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zfabric import ConfigError, RetryPolicy, SendTimeout, SidecarConfig, SocketOptions
from zfabric.cli import app
from zfabric.errors import TopologyError
from zfabric.topology import (
    ForwarderSpec,
    GroupSpec,
    QueueSpec,
    ServiceSpec,
    TopicSpec,
    Topology,
    load_topology,
    load_topology_text,
)
from zfabric.topology.fabric import ENV_VAR, Fabric
from zfabric.topology.graph import mermaid

from .conftest import ROOT

runner = CliRunner()
SHIPPED = sorted((ROOT / "topologies").glob("*.yaml"))
BAD = sorted((ROOT / "tests" / "topologies").glob("bad-*.yaml"))


def expectations(path: Path) -> tuple[str, int]:
    text = path.read_text()
    expect = re.search(r"^# expect: (.*)$", text, re.M)
    line = re.search(r"^# expect-line: (\d+)$", text, re.M)
    assert expect and line, f"{path.name} lacks its # expect: and # expect-line: comments"
    return expect.group(1), int(line.group(1))


def test_there_are_shipped_topologies_and_bad_fixtures() -> None:
    assert any(p.name == "shop.yaml" for p in SHIPPED)
    assert len(BAD) >= 14


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_topology_validates(path: Path) -> None:
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok: {path}")
    load_topology(path)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_each_bad_fixture_fails_with_its_message_key_path_and_line(path: Path) -> None:
    message, line = expectations(path)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    text = " ".join(result.output.split())  # rich may wrap long lines
    assert message in text, text
    assert f"({path}:{line})" in text, text


def test_validate_exit_codes_as_a_process() -> None:
    good = subprocess.run([sys.executable, "-m", "zfabric", "validate", "topologies/shop.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    bad = subprocess.run([sys.executable, "-m", "zfabric", "validate", "topologies/shop.yaml",
                          "tests/topologies/bad-quorum.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "ok: topologies/shop.yaml" in bad.stdout
    assert "groups.quotes.quorum: 3 is larger than the group's 2 member(s) (tests/topologies/bad-quorum.yaml:8)" in bad.stderr


def test_every_problem_is_reported_at_once_in_line_order() -> None:
    text = """\
hosts: {local: 127.0.0.1}
forwarders:
  events: {xsub: local:5559, xpub: lokal:5560}
queues:
  orders: {sidecar: main, max_attempts: 0}
sidecars:
  main: {address: local:5580, store: a.db, synchronous: sometimes}
services:
  pricing: {address: local:5590, timeout: -1}
"""
    with pytest.raises(TopologyError) as info:
        load_topology_text(text, "shop.yaml")
    problems = info.value.problems
    assert problems == [
        "forwarders.events.xpub: host 'lokal' is not declared in hosts; did you mean 'local'? (shop.yaml:3)",
        "queues.orders.max_attempts: expected a positive integer, got 0 (shop.yaml:5)",
        "sidecars.main.synchronous: expected one of full, normal, got 'sometimes' (shop.yaml:7)",
        "services.pricing.timeout: expected a positive number of seconds, got -1 (shop.yaml:9)",
    ]


@pytest.mark.parametrize("text, message", [
    ("queues:\n  q: {address: 127.0.0.1:5571, producers: [a], consumers: [b], max_attempts: 3}\n",
     "queues.q.max_attempts: a retry policy applies only to reliable queues (add sidecar: NAME) (t.yaml:2)"),
    ("queues:\n  q: {address: 127.0.0.1:5571, producers: [a], consumers: [b, c]}\n",
     "queues.q.consumers: 2 consumers (b, c) cannot all bind one address; set bind: producer"),
    ("queues:\n  q: {address: 127.0.0.1:5571, producers: [a]}\n", "queues.q.producers: producers a but no consumers (t.yaml:2)"),
    ("queues:\n  q: {address: 127.0.0.1:5571, backlog: -5}\n",
     "queues.q.backlog: expected a number of messages, 0 or more, or null, got -5 (t.yaml:2)"),
    ("queues:\n  q: {sidecar: main, backlog: 10}\nsidecars:\n  main: {address: 127.0.0.1:5580, store: s.db}\n",
     "queues.q.backlog: applies only to plain queues"),
    ("forwarders:\n  f: {xsub: 127.0.0.1:5559, xpub: 127.0.0.1:5560}\ntopics:\n  t: {subscribers: [x]}\n",
     "topics.t.subscribers: subscribers x but no publishers (t.yaml:4)"),
    ("forwarders:\n  f: {xsub: '*:5559', xpub: 127.0.0.1:5560}\nservices:\n  s: {address: 127.0.0.1:5559}\n",
     "services.s.address: tcp://127.0.0.1:5559 is already bound by forwarder f (xsub)"),
    ("services:\n  s: {address: 127.0.0.1:70000}\n", "services.s.address: endpoint 'tcp://127.0.0.1:70000': port must be 0-65535"),
    ("services:\n  s: {}\n", "services.s.address: an address is required"),
    ("groups:\n  g: {members: {}}\n", "groups.g.members: expected a mapping of member names to addresses, got an empty mapping"),
    ("defaults: {linger_ms: -1}\n", "defaults.linger_ms: must be >= 0, got -1 (t.yaml:1)"),
    ("defaults: {lnger_ms: 5}\n", "defaults.lnger_ms: unknown key; did you mean 'linger_ms'? (t.yaml:1)"),
    ("forwarders:\n  f: {xsub: 127.0.0.1:1, xpub: 127.0.0.1:2, options: {send_hwm: lots}}\n",
     "forwarders.f.options.send_hwm: expected an integer, got 'lots' (t.yaml:2)"),
    ("forwarders: [a, b]\n", "forwarders: expected a mapping of forwarders, got a list (t.yaml:1)"),
    ("- just\n- a list\n", "topology: expected a mapping of sections, got a list"),
    ("defaults: {transport: ipc, ipc_dir: /" + "x" * 120 + "}\nservices:\n  s: {}\n", "is longer than the 107 characters"),
    ("deep: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32 levels (t.yaml:1)"),
])
def test_validation_messages(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_topology_text(text, "t.yaml")
    assert message in str(info.value)


def test_an_oversize_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * (1 << 20) + "\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "is larger than the 1,048,576 allowed" in " ".join(result.output.split())


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "cannot read topology file: No such file or directory" in result.output


SMALL = """\
name: small
hosts: {edge: 10.0.0.7}
defaults: {send_hwm: 50, request_timeout: 0.75}
forwarders:
  events: {xsub: edge:5559, xpub: "tcp://edge:5560"}
topics:
  sales: {publishers: [shop], subscribers: [books]}
sidecars:
  main: {address: 127.0.0.1:5580, store: data/main.db, synchronous: normal}
queues:
  orders: {sidecar: main, max_attempts: 3, ttl: 60, producers: [shop], consumers: [warehouse]}
  mail: {address: 127.0.0.1:5571, bind: producer, send_timeout: 2, backlog: 0}
services:
  pricing: {address: 127.0.0.1:5590, retries: 0}
groups:
  quotes: {members: {a: 127.0.0.1:5701, b: "[::1]:5702"}, quorum: 1}
"""


def test_yaml_builds_the_same_objects_code_builds(tmp_path: Path) -> None:
    loaded = load_topology_text(SMALL, "small.yaml", base_dir=tmp_path)
    options = SocketOptions(send_hwm=50)
    by_hand = Topology(
        name="small",
        forwarders={"events": ForwarderSpec("tcp://10.0.0.7:5559", "tcp://10.0.0.7:5560")},
        topics={"sales": TopicSpec("events", publishers=("shop",), subscribers=("books",))},
        queues={"orders": QueueSpec(sidecar="main", producers=("shop",), consumers=("warehouse",)),
                "mail": QueueSpec(address="tcp://127.0.0.1:5571", bind="producer", send_timeout=2, backlog=0)},
        sidecars={"main": SidecarConfig(store=tmp_path / "data" / "main.db", endpoint="tcp://127.0.0.1:5580",
                                        synchronous="normal", queues={"orders": RetryPolicy(max_attempts=3, ttl=60)})},
        services={"pricing": ServiceSpec("tcp://127.0.0.1:5590", timeout=0.75, retries=0)},
        groups={"quotes": GroupSpec({"a": "tcp://127.0.0.1:5701", "b": "tcp://[::1]:5702"}, quorum=1)},
        options=options, hosts={"edge": "10.0.0.7"}, control=loaded.control, source="small.yaml",
    )
    assert loaded == by_hand
    assert loaded.host_of(loaded.forwarders["events"].xsub) == "edge"
    assert loaded.host_of(loaded.services["pricing"].address) is None


def test_a_topology_built_in_code_gets_the_same_wiring_checks() -> None:
    bad = Topology(
        forwarders={"events": ForwarderSpec("tcp://127.0.0.1:5559", "tcp://127.0.0.1:5560")},
        topics={"sales": TopicSpec("evnts")},
        queues={"orders": QueueSpec(sidecar="main")},
        services={"pricing": ServiceSpec("tcp://127.0.0.1:5559", clients=("shop",))},
    )
    with pytest.raises(TopologyError) as info:
        bad.check()
    assert info.value.problems == [
        "services.pricing.address: tcp://127.0.0.1:5559 is already bound by forwarder events (xsub) "
        "(forwarders.events.xsub); two parts cannot bind one address",
        "topics.sales.forwarder: 'evnts' is not a declared forwarder; did you mean 'events'?",
        "queues.orders.sidecar: 'main' is not a declared sidecar; no sidecars are declared",
        "services.pricing.clients: clients shop but no servers",
    ]
    with pytest.raises(ConfigError, match="quorum: 3 is larger than the group's 1 member"):
        GroupSpec({"a": "tcp://127.0.0.1:1"}, quorum=3)


# ---- Fabric: the parts by name, over real sockets ---------------------------------------

def ipc_topology(ipc_dir: Path, tmp_path: Path) -> str:
    return f"""\
name: t
defaults: {{transport: ipc, ipc_dir: "{ipc_dir}", request_timeout: 2.0, linger_ms: 200}}
forwarders: {{events: {{}}}}
topics: {{sales: {{}}, returns: {{}}}}
sidecars: {{main: {{store: "{tmp_path}/state/main.db"}}}}
queues:
  orders: {{sidecar: main, max_attempts: 2, backoff_base: 0.05}}
  mail: {{}}
services: {{pricing: {{}}}}
groups: {{quotes: {{members: [a, b], quorum: 2, deadline: 2.0}}}}
"""


@pytest.fixture
def fabric(ipc_dir: Path, tmp_path: Path) -> Fabric:
    path = tmp_path / "t.yaml"
    path.write_text(ipc_topology(ipc_dir, tmp_path))
    with Fabric.from_topology(path) as f:
        yield f


@pytest.mark.timeout(60)
def test_fabric_gives_every_pattern_by_name_sync(fabric: Fabric) -> None:
    assert fabric.topology.queues["mail"].address == f"ipc://{fabric.topology.forwarders['events'].xsub[6:].rsplit('/', 1)[0]}/queue-mail"
    fabric.forwarder("events").start()
    fabric.sidecar("main").start()

    mail_in = fabric.consumer("mail")
    mail_out = fabric.producer("mail")
    mail_out.wait_for_consumers(1, timeout=10)
    for i in range(20):
        mail_out.send({"n": i})
    assert [mail_in.receive(timeout=5).body["n"] for _ in range(20)] == list(range(20))

    handled: list[int] = []
    done = threading.Event()

    def handle(env: object) -> None:
        handled.append(env.body["n"])  # type: ignore[attr-defined]
        if len(handled) == 10:
            done.set()

    fabric.worker("orders", handle).start()
    orders = fabric.producer("orders")
    orders.send_many([{"n": i} for i in range(10)])
    assert done.wait(15)
    assert sorted(handled) == list(range(10))

    sub = fabric.subscriber("sales", "returns")
    sub.wait_ready(10)
    pub = fabric.publisher("sales")
    pub.wait_for_subscribers(1, topic="sales", timeout=10)
    pub.publish("sales", 1)
    pub.publish("returns", 2)
    got = {sub.receive(timeout=5).topic: None for _ in range(2)}
    assert set(got) == {"sales", "returns"}

    fabric.replier("pricing", lambda env: {"price": env.body * 2}).start()
    assert fabric.requester("pricing").request(21) == {"price": 42}

    for name in ("a", "b"):
        fabric.member("quotes", name, lambda env, name=name: f"{name}:{env.body}").start()
    result = fabric.scatterer("quotes").scatter("x")
    assert sorted(result.bodies) == ["a:x", "b:x"]
    assert result.quorum_met


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backlog", [0, None])
def test_a_queues_backlog_setting_reaches_its_producers(ipc_dir: Path, tmp_path: Path, backlog: int | None) -> None:
    setting = "" if backlog is None else f", backlog: {backlog}"
    path = tmp_path / "q.yaml"
    path.write_text(f'defaults: {{transport: ipc, ipc_dir: "{ipc_dir}", send_hwm: 5, receive_hwm: 5}}\n'
                    f"queues:\n  jobs: {{send_timeout: 0.2{setting}}}\n")
    with Fabric.from_topology(path) as fabric:
        consumer = fabric.consumer("jobs")  # reads nothing until the producer is full
        producer = fabric.producer("jobs")
        producer.wait_for_consumers(1, timeout=10)
        sent = 0
        with pytest.raises(SendTimeout):
            while sent < 1_000_000:
                producer.send({"n": sent})
                sent += 1
        assert [consumer.receive(timeout=5).body["n"] for _ in range(sent)] == list(range(sent))
        if backlog == 0:
            assert producer.stats.backlogged == 0
        else:  # the default backlog took messages while the queue was full
            assert producer.stats.backlogged > 0


@pytest.mark.timeout(60)
def test_fabric_gives_the_asyncio_faces_too(fabric: Fabric) -> None:
    fabric.forwarder("events").start()
    fabric.sidecar("main").start()
    fabric.replier("pricing", lambda env: env.body + 1).start()

    async def main() -> None:
        mail_in = fabric.consumer("mail", asyncio=True)
        mail_out = fabric.producer("mail", asyncio=True)
        await mail_out.wait_for_consumers(1, timeout=10)
        await mail_out.send("hello")
        assert (await mail_in.receive(timeout=5)).body == "hello"

        got: asyncio.Queue[object] = asyncio.Queue()

        async def handle(env: object) -> None:
            await got.put(env.body)  # type: ignore[attr-defined]

        worker = fabric.worker("orders", handle, asyncio=True)
        task = asyncio.create_task(worker.run())
        await fabric.producer("orders", asyncio=True).send({"id": 7})
        assert await asyncio.wait_for(got.get(), 10) == {"id": 7}
        worker.stop()
        await asyncio.wait_for(task, 10)

        sub = fabric.subscriber("sales", asyncio=True)
        await sub.wait_ready(10)
        pub = fabric.publisher("sales", asyncio=True)
        await pub.wait_for_subscribers(1, topic="sales", timeout=10)
        await pub.publish("sales", "sold")
        assert (await sub.receive(timeout=5)).body == "sold"

        assert await fabric.requester("pricing", asyncio=True).request(1) == 2

    asyncio.run(main())


def test_fabric_names_what_is_wrong(fabric: Fabric, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no queue 'ordrs'; did you mean 'orders'\?"):
        fabric.producer("ordrs")
    with pytest.raises(ConfigError, match=r"queue 'orders' is reliable \(sidecar 'main'\): take its messages with "
                                          r"fabric.worker\('orders', handler\)"):
        fabric.consumer("orders")
    with pytest.raises(ConfigError, match="queue 'mail' is a plain queue"):
        fabric.worker("mail", print)
    with pytest.raises(ConfigError, match="has no member of group 'quotes' named 'c'; declared: a, b"):
        fabric.member("quotes", "c", print)
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match=r"no topology file given and \$ZFABRIC_TOPOLOGY is not set"):
        Fabric.from_topology()
    monkeypatch.setenv(ENV_VAR, str(ROOT / "topologies" / "shop.yaml"))
    assert Fabric.from_topology().topology.name == "shop"


def test_the_forwarder_and_sidecar_commands_refuse_mixed_settings(tmp_path: Path) -> None:
    result = runner.invoke(app, ["forwarder", "--topology", "topologies/shop.yaml", "--xsub", "tcp://127.0.0.1:1"])
    assert result.exit_code == 1
    assert "--topology gives the forwarder's addresses and options" in result.output
    result = runner.invoke(app, ["sidecar", "--topology", "topologies/shop.yaml", "--store", str(tmp_path / "x.db")])
    assert result.exit_code == 1
    assert "--topology gives the sidecar's queues, store and policies" in result.output
    result = runner.invoke(app, ["sidecar", "--topology", "topologies/shop.yaml", "--name", "orders-stor"])
    assert result.exit_code == 1
    assert "has no sidecar 'orders-stor'; did you mean 'orders-store'?" in " ".join(result.output.split())


# ---- graph --------------------------------------------------------------------------------

def test_graph_draws_every_part_and_who_talks_to_whom() -> None:
    result = runner.invoke(app, ["graph", "topologies/shop.yaml", "--markdown"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.startswith("```mermaid\nflowchart LR\n") and text.rstrip().endswith("```")
    for edge in ("app_checkout -->|publish| topic_sales", "topic_sales --> app_analytics", "topic_sales --> app_mailer",
                 "app_checkout --> queue_orders", "queue_orders --> app_fulfilment", "queue_orders -.- sidecar_orders_store",
                 "app_checkout -->|request| service_pricing", "app_checkout -->|scatter| group_quotes",
                 "group_quotes --> member_quotes_supplier_a", "topic_sales -.- fwd_events"):
        assert edge in text
    assert 'queue_orders[("reliable queue orders<br/>max attempts 4")]' in text


def test_graph_ids_and_labels_survive_odd_names() -> None:
    t = Topology(forwarders={'ev"ents': ForwarderSpec("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")},
                 topics={"a.b": TopicSpec('ev"ents', publishers=("x y",), subscribers=("<z>",)),
                         "a_b": TopicSpec('ev"ents')})
    text = mermaid(t, addresses=False)
    assert 'fwd_ev_ents{{"forwarder ev#quot;ents"}}' in text
    assert "topic_a_b>" in text and "topic_a_b_2>" in text
    assert 'app__z_("#lt;z#gt;")' in text
    for line in text.splitlines()[1:]:
        node_id = re.match(r"\s+(\w+)", line)
        assert node_id, line


def test_the_shop_picture_in_topologies_readme_is_what_graph_draws() -> None:
    text = (ROOT / "topologies" / "README.md").read_text()
    shown = text.split("```mermaid\n", 1)[1].split("```", 1)[0]
    assert shown == mermaid(load_topology(ROOT / "topologies" / "shop.yaml"), addresses=False)


def test_up_host_selects_the_components_on_that_host() -> None:
    from zfabric.topology.supervisor import Supervisor

    path = ROOT / "topologies" / "two-hosts.yaml"
    assert [(c.status.kind, c.status.name) for c in Supervisor(path, host="edge").components] == [("forwarder", "events")]
    assert [(c.status.kind, c.status.name) for c in Supervisor(path, host="core").components] == [("sidecar", "jobs")]
    assert len(Supervisor(path).components) == 2
    result = runner.invoke(app, ["up", str(path), "--host", "egde"])
    assert result.exit_code == 1
    assert "--host 'egde' is not declared in" in result.output


def test_up_gives_each_component_its_linger_before_it_kills_it(tmp_path: Path) -> None:
    """A stopped forwarder or sidecar hands over what it accepted within its linger: `up` must not SIGKILL it sooner."""
    from zfabric.topology.supervisor import Supervisor

    path = tmp_path / "lingering.yaml"
    path.write_text(
        "version: 1\nname: lingering\ndefaults: {linger_ms: 4000}\n"
        "forwarders:\n  slow: {xsub: 127.0.0.1:0, xpub: 127.0.0.1:0, options: {linger_ms: 9000}}\n"
        "  quick: {xsub: 127.0.0.1:0, xpub: 127.0.0.1:0, options: {linger_ms: 500}}\n"
        f"sidecars:\n  jobs: {{address: 127.0.0.1:0, store: {tmp_path / 'jobs.db'}}}\n"
        "queues:\n  work: {sidecar: jobs}\n"
    )
    timeouts = {c.status.name: c.stop_timeout for c in Supervisor(path).components}
    assert timeouts == {"slow": 11.0, "quick": 5.0, "jobs": 6.0}
