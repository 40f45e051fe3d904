"""Every code example in README.md and docs/ runs, and the wire example matches the codec byte for byte."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from zfabric import Envelope, Kind, codec

from .conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for n, match in enumerate(BLOCK.finditer(page.read_text()), 1):
            found.append((f"{page.relative_to(ROOT)}#{n}", match.group(1)))
    return found


@pytest.mark.parametrize(("where", "code"), examples(), ids=[w for w, _ in examples()])
def test_example_runs(where: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, f"{where} failed:\n{done.stdout}\n{done.stderr}"


def _hex_after(text: str, heading: str) -> bytes:
    block = text.split(heading, 1)[1].split("\n\n", 1)[0]
    octets = []
    for line in block.splitlines()[1:]:
        for token in line.split():
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            octets.append(token)
    return bytes.fromhex("".join(octets))


def test_wire_md_worked_example_is_what_the_codec_writes() -> None:
    text = (ROOT / "docs" / "wire.md").read_text()
    env = Envelope(bytes.fromhex("0102030405060708") + (1).to_bytes(8, "big"), Kind.REQUEST, "", {"sku": "A-1"},
                   None, None, 1, 1700000000.5, 1700000005.5, {}, None)
    header, body = codec.encode_split(env)
    assert _hex_after(text, "header frame, 46 bytes:") == header
    assert _hex_after(text, "body frame, 9 bytes:") == body
    assert codec.decode([header, body]) == env
    [one] = codec.encode(env)
    assert _hex_after(text, "one frame, 55 bytes:") == one
    assert codec.decode([one]) == env
