"""`zfabric request` and `zfabric echo`: ask a service, or run a replier that answers with the request."""

from __future__ import annotations

import signal
import time
from typing import Annotated

import typer

from ..envelope import Envelope
from ._common import dumps, err_console, fabric_errors, payloads


@fabric_errors
def request(
    service: Annotated[str, typer.Argument(help="The replier's address, e.g. tcp://127.0.0.1:5580.")],
    payload: Annotated[str | None, typer.Argument(help="JSON payload; omit or '-' to send one request per stdin line.")] = None,
    text: Annotated[bool, typer.Option(help="Send the payload as a string instead of parsing JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each attempt's reply.")] = 5.0,
    retries: Annotated[int, typer.Option(help="Extra attempts, each on a fresh socket, after a timeout.")] = 2,
) -> None:
    """Send a request and print the reply as JSON (exit 1 on a remote error, 3 on timeout).

    Example:  zfabric request tcp://127.0.0.1:5580 '{"sku": "A-1"}'
    """
    from ..patterns.reqrep import Requester

    with Requester(service, timeout=timeout, retries=retries) as requester:
        for body in payloads(payload, as_text=text):
            typer.echo(dumps(requester.request(body)))


@fabric_errors
def echo(
    endpoint: Annotated[str, typer.Option("--endpoint", "-e", help="Address to bind and serve on.")] = "tcp://127.0.0.1:5580",
    count: Annotated[int, typer.Option(help="Exit after answering this many requests (0: until Ctrl-C/SIGTERM).")] = 0,
    delay: Annotated[float, typer.Option(min=0.0, help="Seconds to spend on each request before answering (simulated work).")] = 0.0,
) -> None:
    """Run a replier that answers every request with its own body (for trying things out).

    Example:  zfabric echo -e tcp://127.0.0.1:5580
    """
    from ..patterns.reqrep import Replier


    def handle(env: Envelope) -> object:
        if delay:
            time.sleep(delay)
        return env.body

    with Replier(endpoint, handle) as replier:
        signal.signal(signal.SIGTERM, lambda s, f: replier.stop())
        signal.signal(signal.SIGINT, lambda s, f: replier.stop())
        print(f"zfabric echo ready endpoint={replier.endpoint}", flush=True)
        replier.serve(max_requests=count or None)
        err_console.print(f"answered {replier.stats.replies} request(s)")
