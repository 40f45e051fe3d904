"""`zfabric pub` and `zfabric sub`: publish and watch topics from a terminal."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import ReadyTimeout
from ..options import DEFAULT_FORWARDER_XPUB, DEFAULT_FORWARDER_XSUB
from ._common import err_console, fabric_errors, payloads, show


@fabric_errors
def pub(
    topic: Annotated[str, typer.Argument(help="Topic to publish on.")],
    payload: Annotated[str | None, typer.Argument(help="JSON payload; omit or '-' to read one per stdin line.")] = None,
    endpoint: Annotated[str, typer.Option("--endpoint", "-e", envvar="ZFABRIC_XSUB", help="Forwarder XSUB address (or, with --bind, where to bind).")] = DEFAULT_FORWARDER_XSUB,
    bind: Annotated[bool, typer.Option(help="Bind instead of connecting (direct pub/sub, no forwarder).")] = False,
    text: Annotated[bool, typer.Option(help="Send the payload as a string instead of parsing JSON.")] = False,
    wait_subscribers: Annotated[int, typer.Option(help="Wait until this many subscriptions match TOPIC before publishing.")] = 1,
    wait_timeout: Annotated[float, typer.Option(help="Seconds to wait for subscribers; then publish anyway, with a warning.")] = 3.0,
) -> None:
    """Publish JSON payloads on a topic.

    Example:  zfabric pub sales.eu '{"order": 42, "total": 9.5}'
    """
    from ..patterns.pubsub import Publisher

    with Publisher(endpoint, bind=bind) as publisher:
        if wait_subscribers > 0:
            try:
                publisher.wait_for_subscribers(wait_subscribers, topic, timeout=wait_timeout)
            except ReadyTimeout as exc:
                err_console.print(f"[yellow]warning:[/yellow] {exc}; publishing anyway")
        count = 0
        for body in payloads(payload, as_text=text):
            publisher.publish(topic, body)
            count += 1
        err_console.print(f"published {count} message(s) on {topic!r}")


@fabric_errors
def sub(
    topics: Annotated[list[str], typer.Argument(help="Topic prefixes to subscribe to ('' for everything).")],
    endpoint: Annotated[str, typer.Option("--endpoint", "-e", envvar="ZFABRIC_XPUB", help="Forwarder XPUB address (or a direct publisher's).")] = DEFAULT_FORWARDER_XPUB,
    count: Annotated[int, typer.Option(help="Exit after this many messages (0: run until Ctrl-C).")] = 0,
    timeout: Annotated[float, typer.Option(help="Exit with code 3 if no message arrives for this many seconds (0: wait forever).")] = 0.0,
    envelope: Annotated[bool, typer.Option(help="Print each whole envelope as JSON instead of 'topic body'.")] = False,
) -> None:
    """Print each message on the given topics as it arrives: `topic json-body` per line.

    Example:  zfabric sub sales. --count 10
    """
    from ..patterns.pubsub import Subscriber

    with Subscriber(endpoint, topics=topics) as subscriber:
        try:
            subscriber.wait_ready(timeout=5.0)
            err_console.print(f"subscribed to {', '.join(repr(t) for t in topics)} at {subscriber.endpoint}")
        except ReadyTimeout:
            err_console.print("[yellow]warning:[/yellow] subscription not confirmed within 5 s (no forwarder?); listening anyway")
        received = 0
        try:
            while count == 0 or received < count:
                show(subscriber.receive(timeout or None), envelope=envelope, with_topic=True)
                received += 1
        finally:
            if subscriber.gaps:
                err_console.print(f"[yellow]missed {subscriber.gaps} message(s) (sequence gaps)[/yellow]")
