"""`Curve`: the CURVE settings one socket runs with, carried in `SocketOptions.curve`.

A socket that binds is a CURVE server: it uses `keypair` as its server key pair and
accepts only the keys in `allow` (through the ZAP handler; it refuses to bind without
one). A socket that connects is a CURVE client: it proves `keypair` and checks that the
server holds the secret of `server_key`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .keys import KeyPair, require_curve
from .zap import Allowlist


@dataclass(frozen=True, eq=False)
class Curve:
    """Encryption and authentication for one socket (see the module docstring for the two roles)."""

    keypair: KeyPair
    """This side's key pair (the secret half is required)."""
    server_key: bytes | None = None
    """Connecting sockets: the z85 public key of the server they connect to."""
    allow: Allowlist | None = None
    """Binding sockets: who may connect."""

    def __post_init__(self) -> None:
        require_curve()
        if self.keypair.secret is None:
            raise ConfigError(f"CURVE key {self.keypair.name!r}: the secret key is needed (load it with load_pair)")
        if self.server_key is not None and len(self.server_key) != 40:
            raise ConfigError("CURVE server_key: expected a 40-character z85 public key")

    def client(self, server_key: bytes) -> Curve:
        """The same identity, connecting to a server with this public key."""
        return Curve(self.keypair, server_key, self.allow)

    def __repr__(self) -> str:
        server = f", server={self.server_key[:8].decode()}" if self.server_key else ""
        allow = f", allow={self.allow.source}" if self.allow is not None else ""
        return f"Curve({self.keypair.key_id}{server}{allow})"
