"""`zfabric keys generate | show`: CURVE key pairs for clients and servers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import fabric_errors

app = typer.Typer(no_args_is_help=True, help="Create and show CURVE key pairs (for CURVE-secured fabrics).")


@app.command("generate")
@fabric_errors
def generate_cmd(
    name: Annotated[str, typer.Argument(help="The key's name: what logs, counters and permission rules call its holder.")],
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Where to write NAME.key and NAME.key_secret (made 0700).")],
    force: Annotated[bool, typer.Option(help="Replace an existing key pair of this name.")] = False,
) -> None:
    """Write a new key pair: NAME.key (public, give it to servers' allowlists) and NAME.key_secret (0600).

    Example:  zfabric keys generate checkout --dir keys/
    """
    from ..security.keys import PUBLIC_SUFFIX, generate

    pair = generate(name, directory, overwrite=force)
    typer.echo(f"wrote {directory / (name + PUBLIC_SUFFIX)} (public) and {directory / (name + '.key_secret')} (secret, 0600)")
    typer.echo(f"public key: {pair.public.decode()}")


@app.command()
@fabric_errors
def show(
    key: Annotated[Path, typer.Argument(help="A key file (NAME.key or NAME.key_secret); only the public key is printed.")],
) -> None:
    """Print a key's public half (never the secret), e.g. to add it to an allowlist elsewhere.

    Example:  zfabric keys show keys/checkout.key
    """
    from ..security.keys import load_public

    pair = load_public(key)
    typer.echo(f"{pair.name} {pair.public.decode()}")
