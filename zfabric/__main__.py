"""`python -m zfabric` runs the CLI."""

from .cli import main

main()
