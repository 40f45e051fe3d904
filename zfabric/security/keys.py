"""CURVE key pairs on disk: `NAME.key` (public, shareable) and `NAME.key_secret` (secret, 0600 in a 0700 directory).

The files are small text files, one z85 key each (40 characters), with a comment line;
the name of a key is its file name without the suffix, and that name is what logs,
counters and permission rules call the client.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq

from ..errors import ConfigError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_Z85 = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


@dataclass(frozen=True)
class KeyPair:
    """A named CURVE key pair (z85 bytes); `secret` is None when only the public half was loaded."""

    name: str
    public: bytes
    secret: bytes | None = None

    @property
    def key_id(self) -> str:
        """A short, loggable form: the name and the first 8 characters of the public key."""
        return f"{self.name}({self.public[:8].decode()})"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def require_curve() -> None:
    """Refuse to secure anything with a libzmq that is too old or built without CURVE, saying why."""
    version = zmq.zmq_version_info()
    if version < (4, 3, 5):
        raise ConfigError(f"libzmq {zmq.zmq_version()} is older than 4.3.5, which fixed remotely triggerable bugs "
                          "(CVE-2019-13132, CVE-2020-15166); upgrade pyzmq (its wheels bundle libzmq)")
    if not zmq.has("curve"):
        raise ConfigError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE; install a pyzmq wheel, "
                          "which bundles libzmq with CURVE")


def generate(name: str, directory: str | os.PathLike[str], *, overwrite: bool = False) -> KeyPair:
    """Write NAME.key and NAME.key_secret into `directory` (made 0700); the secret file is 0600 from its creation."""
    check_name(name)
    require_curve()
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    public, secret = zmq.curve_keypair()
    pub_path, sec_path = d / (name + PUBLIC_SUFFIX), d / (name + SECRET_SUFFIX)
    if not overwrite and (pub_path.exists() or sec_path.exists()):
        raise ConfigError(f"{sec_path if sec_path.exists() else pub_path} already exists; to replace it, pass --force (overwrite=True in code)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(sec_path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, b"# zfabric CURVE secret key " + name.encode() + b": keep private\n" + secret + b"\n")
    finally:
        os.close(fd)
    pub_path.write_bytes(b"# zfabric CURVE public key " + name.encode() + b"\n" + public + b"\n")
    return KeyPair(name, public, secret)


def _read_key(path: Path) -> bytes:
    try:
        lines = [line.strip() for line in path.read_bytes().splitlines()]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read key file: {exc.strerror}") from None
    keys = [line for line in lines if line and not line.startswith(b"#")]
    if len(keys) != 1 or not _Z85.fullmatch(keys[0]):
        raise ConfigError(f"{path}: not a zfabric key file (expected one 40-character z85 key)")
    return keys[0]


def load_public(path: str | os.PathLike[str]) -> KeyPair:
    """The public half from NAME.key (a path to NAME.key_secret also works: its .key sibling is read)."""
    p = Path(path)
    if p.name.endswith(SECRET_SUFFIX):
        p = p.with_name(p.name[: -len(SECRET_SUFFIX)] + PUBLIC_SUFFIX)
    if not p.name.endswith(PUBLIC_SUFFIX):
        raise ConfigError(f"{p}: a public key file is named NAME{PUBLIC_SUFFIX}")
    return KeyPair(p.name[: -len(PUBLIC_SUFFIX)], _read_key(p))


def load_pair(path: str | os.PathLike[str]) -> KeyPair:
    """A whole key pair from NAME.key_secret (or NAME.key: its secret sibling is read); refuses a readable secret."""
    p = Path(path)
    if p.name.endswith(PUBLIC_SUFFIX):
        p = p.with_name(p.name + "_secret")
    if not p.name.endswith(SECRET_SUFFIX):
        raise ConfigError(f"{p}: a secret key file is named NAME{SECRET_SUFFIX}")
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read secret key: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{p}: secret key is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    secret = _read_key(p)
    public = zmq.curve_public(secret)
    pub_file = p.with_name(p.name[: -len(SECRET_SUFFIX)] + PUBLIC_SUFFIX)
    if pub_file.exists() and _read_key(pub_file) != public:
        raise ConfigError(f"{pub_file} does not match {p}: the public key is not the secret key's pair")
    return KeyPair(p.name[: -len(SECRET_SUFFIX)], public, secret)


def find(directory: str | os.PathLike[str], name: str, *, secret: bool) -> KeyPair:
    """Key `name` in `directory`: the pair when `secret`, else the public half; errors say which file is missing."""
    check_name(name)
    d = Path(directory)
    path = d / (name + (SECRET_SUFFIX if secret else PUBLIC_SUFFIX))
    if not path.exists():
        hint = f"; create it with: zfabric keys generate {name} --dir {d}"
        raise ConfigError(f"{path}: no {'secret' if secret else 'public'} key named {name!r}{hint}")
    return load_pair(path) if secret else load_public(path)
