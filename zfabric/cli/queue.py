"""`zfabric push` and `zfabric pull`: feed and drain a point-to-point queue from a terminal."""

from __future__ import annotations

from typing import Annotated

import typer

from ._common import err_console, fabric_errors, payloads, show


@fabric_errors
def push(
    payload: Annotated[str | None, typer.Argument(help="JSON payload; omit or '-' to read one per stdin line.")] = None,
    endpoint: Annotated[str, typer.Option("--endpoint", "-e", envvar="ZFABRIC_QUEUE", help="Queue address to connect to (or bind, with --bind).")] = "tcp://127.0.0.1:5570",
    bind: Annotated[bool, typer.Option(help="Bind instead of connecting.")] = False,
    text: Annotated[bool, typer.Option(help="Send the payload as a string instead of parsing JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Give up (exit 3) when no consumer takes a message for this many seconds.")] = 10.0,
) -> None:
    """Send JSON payloads into a queue; each reaches exactly one consumer.

    Example:  echo '{"job": 1}' | zfabric push -e tcp://127.0.0.1:5570
    """
    from ..patterns.queue import Producer

    with Producer(endpoint, bind=bind, send_timeout=timeout) as producer:
        count = 0
        for body in payloads(payload, as_text=text):
            producer.send(body)
            count += 1
        err_console.print(f"sent {count} message(s) to {producer.endpoint}")


@fabric_errors
def pull(
    endpoint: Annotated[str, typer.Option("--endpoint", "-e", envvar="ZFABRIC_QUEUE", help="Queue address to bind (or connect to, with --connect).")] = "tcp://127.0.0.1:5570",
    connect: Annotated[bool, typer.Option(help="Connect instead of binding.")] = False,
    count: Annotated[int, typer.Option(help="Exit after this many messages (0: run until Ctrl-C).")] = 0,
    timeout: Annotated[float, typer.Option(help="Exit with code 3 if no message arrives for this many seconds (0: wait forever).")] = 0.0,
    envelope: Annotated[bool, typer.Option(help="Print each whole envelope as JSON instead of the body.")] = False,
) -> None:
    """Receive queue messages and print each body as one JSON line.

    Example:  zfabric pull -e tcp://127.0.0.1:5570 --count 1
    """
    from ..patterns.queue import Consumer

    with Consumer(endpoint, bind=not connect) as consumer:
        err_console.print(f"pulling from {consumer.endpoint}")
        received = 0
        while count == 0 or received < count:
            show(consumer.receive(timeout or None), envelope=envelope)
            received += 1
