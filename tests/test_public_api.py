"""The public surface: what `zfabric` exports, and the validation at its edges."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import zfabric
from zfabric import ConfigError, Endpoint, SocketOptions


def test_all_is_sorted_and_names_exactly_the_public_members() -> None:
    """The package's names are imported lazily, from three lists (the type checkers' imports, the lazy map and
    `__all__`): all three, and what `dir()` shows, name one set, each from the module that defines it."""
    assert zfabric.__all__ == sorted(zfabric.__all__)
    assert dir(zfabric) == zfabric.__all__
    loaded = {name for name in vars(zfabric) if not name.startswith("_") and not inspect.ismodule(getattr(zfabric, name))}
    assert loaded - {"TYPE_CHECKING"} <= set(zfabric.__all__), "a public name outside __all__"
    assert set(zfabric.__all__) - {"__version__"} == set(zfabric._HOME)
    source = ast.parse(Path(zfabric.__file__).read_text())
    checked = next(node for node in source.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    typed = {alias.name: node.module for node in checked.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert typed == zfabric._HOME
    for name, module in typed.items():
        assert getattr(zfabric, name) is getattr(importlib.import_module(f"zfabric.{module}"), name)
    with pytest.raises(AttributeError, match="no attribute 'Nonexistent'"):
        zfabric.Nonexistent  # noqa: B018


def test_importing_the_package_loads_none_of_its_patterns_and_a_pattern_only_what_it_needs() -> None:
    """`import zfabric` costs milliseconds, not the 0.45 s of importing every module; `from zfabric import
    Producer` loads the queue, not the sidecar, the topology loader or YAML."""
    code = ("import sys, zfabric; first = set(sys.modules); from zfabric import Producer; "
            "print(sorted(m for m in first if m.startswith(('zfabric.', 'zmq', 'yaml')))); "
            "print(sorted(m for m in sys.modules if m.startswith(('zfabric.sidecar', 'zfabric.topology', 'yaml'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "[]"]


def test_every_error_derives_from_fabric_error() -> None:
    errors = [getattr(zfabric, n) for n in zfabric.__all__ if n.endswith(("Error", "Timeout"))]
    assert errors and all(issubclass(e, zfabric.FabricError) for e in errors)
    assert issubclass(zfabric.RequestTimeout, TimeoutError)


@pytest.mark.parametrize(
    ("text", "address", "bind"),
    [
        ("tcp://10.1.2.3:5555", "tcp://10.1.2.3:5555", False),
        ("@tcp://0.0.0.0:5555", "tcp://0.0.0.0:5555", True),
        (">ipc:///tmp/x.sock", "ipc:///tmp/x.sock", False),
        ("inproc://queue", "inproc://queue", False),
        ("tcp://[::1]:0", "tcp://[::1]:0", False),
    ],
)
def test_endpoint_parsing(text: str, address: str, bind: bool) -> None:
    ep = Endpoint.parse(text)
    assert (ep.address, ep.bind) == (address, bind)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("udp://1.2.3.4:5", "expected one of tcp://"),
        ("tcp://127.0.0.1", "tcp needs host:port"),
        ("tcp://10.1.2.3:99999", "port must be 0-65535"),
        ("ipc://", "is empty"),
        ("127.0.0.1:5555", "expected one of"),
    ],
)
def test_bad_endpoints_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Endpoint.parse(text)


def test_loopback_detection() -> None:
    assert Endpoint.parse("tcp://127.0.0.1:1").is_loopback
    assert Endpoint.parse("tcp://localhost:1").is_loopback
    assert Endpoint.parse("ipc:///tmp/a").is_loopback
    assert not Endpoint.parse("tcp://*:1").is_loopback
    assert not Endpoint.parse("tcp://10.0.0.1:1").is_loopback


def test_options_are_validated_and_frozen() -> None:
    opts = SocketOptions()
    assert opts.replace(send_hwm=5).send_hwm == 5
    with pytest.raises(ConfigError, match="send_hwm"):
        SocketOptions(send_hwm=-1)
    with pytest.raises(ConfigError, match="expected an integer"):
        SocketOptions(linger_ms="1000")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="known options"):
        opts.replace(hwm=5)
    with pytest.raises(AttributeError):
        opts.send_hwm = 3  # type: ignore[misc]
