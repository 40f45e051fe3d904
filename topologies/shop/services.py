"""The shop's services, each a few lines over `Fabric.from_topology`: run one per terminal.

    zfabric up topologies/shop.yaml                          # the forwarder and the sidecar
    python topologies/shop/services.py fulfilment            # reliable worker for `orders`
    python topologies/shop/services.py pricing               # request-reply server
    python topologies/shop/services.py supplier supplier-a   # one member of the `quotes` group (also b, c)
    python topologies/shop/services.py analytics             # subscriber to `sales`
    python topologies/shop/services.py mailer                # asyncio: `sales` subscriber + `receipts` consumer
    python topologies/shop/services.py checkout --orders 20  # uses all of them

Each prints one JSON line per event (for people and for tests) and a summary on exit
(Ctrl-C or SIGTERM). The topology file is --topology, else $ZFABRIC_TOPOLOGY, else the
shop.yaml beside this directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from zfabric import Envelope, FabricTimeout, ReceiveTimeout
from zfabric.topology.fabric import ENV_VAR, Fabric

DEFAULT_TOPOLOGY = Path(__file__).resolve().parent.parent / "shop.yaml"
POISON = "sku-poison"
"""An order for this SKU always fails, to show the dead-letter queue at work."""

stopping = threading.Event()


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def fulfilment(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    handled = 0

    def handle(env: Envelope) -> None:
        nonlocal handled
        order = env.body
        if order["sku"] == POISON:
            raise ValueError(f"no stock can ever exist for {POISON}")
        handled += 1
        say("fulfilled", n=order["n"], attempt=env.attempt)

    worker = fabric.worker("orders", handle, window=20)
    worker.start()
    say("ready", role="fulfilment")
    stopping.wait()
    worker.stop()
    return {"fulfilled": handled}


def pricing(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    def price(env: Envelope) -> dict[str, Any]:
        sku = env.body["sku"]
        return {"sku": sku, "price": round(9.5 + sum(map(ord, sku)) % 17, 2)}

    server = fabric.replier("pricing", price)
    server.start()
    say("ready", role="pricing")
    stopping.wait()
    server.close()
    return {"answered": server.stats.sent}


def supplier(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    def quote(env: Envelope) -> dict[str, Any]:
        return {"supplier": args.name, "sku": env.body["sku"], "cost": 5 + len(args.name) % 3}

    member = fabric.member("quotes", args.name, quote)
    member.start()
    say("ready", role="supplier", name=args.name)
    stopping.wait()
    member.close()
    return {"quoted": member.stats.sent}


def analytics(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    sales = fabric.subscriber("sales")
    sales.wait_ready()
    say("ready", role="analytics")
    seen = 0
    while not stopping.is_set():
        try:
            env = sales.receive(timeout=0.2)
        except ReceiveTimeout:
            continue
        seen += 1
        say("sale", n=env.body["n"], gaps=sales.gaps)
    return {"sales": seen, "gaps": sales.gaps}


def mailer(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    """The asyncio face: one task per input, in one event loop."""
    counts = {"sales": 0, "receipts": 0}

    async def main() -> None:
        sales = fabric.subscriber("sales", asyncio=True)
        receipts = fabric.consumer("receipts", asyncio=True)
        await sales.wait_ready()
        say("ready", role="mailer")

        async def read(inbox: Any, key: str, event: str) -> None:
            while not stopping.is_set():
                try:
                    env = await inbox.receive(timeout=0.2)
                except ReceiveTimeout:
                    continue
                counts[key] += 1
                say(event, n=env.body["n"])

        await asyncio.gather(read(sales, "sales", "sale"), read(receipts, "receipts", "receipt"))

    asyncio.run(main())
    return counts


def checkout(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    orders = fabric.producer("orders")
    receipts = fabric.producer("receipts")
    sales = fabric.publisher("sales")
    prices = fabric.requester("pricing")
    quotes = fabric.scatterer("quotes")
    subscribers = sales.wait_for_subscribers(count=args.subscribers, topic="sales", timeout=30)
    receipts.wait_for_consumers(1, timeout=30)
    say("ready", role="checkout", subscribers=subscribers)
    summary = {"orders": 0, "quorum_met": 0, "failed": 0}
    n = 0
    while not stopping.is_set() and (args.orders == 0 or n < args.orders):
        n += 1
        sku = POISON if args.poison and n == 1 else f"sku-{n % 7}"
        try:
            price = prices.request({"sku": sku})["price"]
            round_ = quotes.scatter({"sku": sku})
            orders.send({"n": n, "sku": sku, "price": price})
        except FabricTimeout as exc:
            summary["failed"] += 1
            say("failed", n=n, error=f"{type(exc).__name__}: {exc}")
            continue
        receipts.send({"n": n, "sku": sku, "price": price})
        sales.publish("sales", {"n": n, "amount": price})
        summary["orders"] += 1
        summary["quorum_met"] += round_.quorum_met
        say("order", n=n, sku=sku, price=price, quotes=round_.answered, quorum_met=round_.quorum_met)
        if args.every:
            stopping.wait(args.every)
    return summary


ROLES = {f.__name__: f for f in (fulfilment, pricing, supplier, analytics, mailer, checkout)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("name", nargs="?", default="supplier-a", help="supplier: which member of the quotes group")
    parser.add_argument("--topology", default=os.environ.get(ENV_VAR) or str(DEFAULT_TOPOLOGY))
    parser.add_argument("--orders", type=int, default=10, help="checkout: orders to place (0: until stopped)")
    parser.add_argument("--every", type=float, default=0.0, help="checkout: seconds between orders")
    parser.add_argument("--subscribers", type=int, default=2, help="checkout: sales subscribers to wait for")
    parser.add_argument("--poison", action="store_true", help="checkout: make the first order one that always fails")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stopping.set())
    started = time.monotonic()
    with Fabric.from_topology(args.topology) as fabric:
        summary = ROLES[args.role](fabric, args)
    say("summary", role=args.role, seconds=round(time.monotonic() - started, 2), **summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
