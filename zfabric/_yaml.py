"""Loading YAML config files safely, remembering the line of every key for error messages.

`yaml.safe_load` alone is not enough for files an operator may be handed: it still expands
alias bombs, accepts any size and depth, and silently keeps the last of two equal keys.
This loader refuses all of those before anything is walked, and refuses any tag beyond
plain strings, numbers, booleans, nulls, lists and mappings (so `!!python/...` never runs).
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MAX_BYTES = 1 << 20
"""Largest config file accepted."""
MAX_NODES = 100_000
"""Most scalars, lists and mappings in one file."""
MAX_DEPTH = 32
"""Deepest nesting of lists and mappings."""

_PLAIN_TAGS = frozenset(
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq")
)

Path_ = tuple[Hashable, ...]
"""A key path into the document: mapping keys and list indexes."""


@dataclass
class Document:
    """A parsed YAML file: plain data plus the line each key path starts on."""

    data: Any
    source: str
    lines: dict[Path_, int] = field(default_factory=dict)

    def line(self, path: Path_) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        path = tuple(path)
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def where(self, path: Path_) -> str:
        """`file:line` for messages."""
        line = self.line(path)
        return f"{self.source}:{line}" if line is not None else self.source


def dotted(path: Path_) -> str:
    """`queues.orders.max_attempts` or `groups.quotes.members[1]`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out


def load_file(path: str | os.PathLike[str], *, what: str = "config") -> Document:
    """Read and parse `path`; ConfigError (naming the file and line) for anything unsafe or malformed."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"{p}: {what} file of {size:,} bytes is larger than the {MAX_BYTES:,} allowed")
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read {what} file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: {what} file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return load_text(text, str(p), what=what)


def load_text(text: str, source: str = "<string>", *, what: str = "config") -> Document:
    """Parse YAML text (see load_file); `source` names it in messages."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(f"{source}: {what} text is larger than the {MAX_BYTES:,} bytes allowed")
    try:
        _screen(text, source)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            doc = Document(None, source)
            if node is not None:
                doc.data = _build(loader, node, (), doc)
            return doc
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        context = exc.context or ""
        if context and exc.context_mark is not None and mark is not None and exc.context_mark.line != mark.line:
            context += f" started on line {exc.context_mark.line + 1},"
        problem = " ".join(str(p) for p in (context, exc.problem) if p)
        raise ConfigError(_at(source, mark.line + 1 if mark is not None else None, (), f"invalid YAML: {problem}")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None


def _at(source: str, line: int | None, path: Path_, message: str) -> str:
    """`key.path: message (file:line)`, the one shape of every config error."""
    where = f"{source}:{line}" if line is not None else source
    return f"{dotted(path) + ': ' if path else ''}{message} ({where})"


def _screen(text: str, source: str) -> None:
    """Refuse aliases, excess nesting and excess size from the event stream, before any node is built."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(_at(source, event.start_mark.line + 1, (),
                                  f"YAML aliases are not allowed (*{event.anchor}); write the value out"))
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(_at(source, event.start_mark.line + 1, (), f"nested deeper than {MAX_DEPTH} levels"))
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if isinstance(event, (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            nodes += 1
            if nodes > MAX_NODES:
                raise ConfigError(f"{source}: more than {MAX_NODES:,} values in one file")


def _build(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, doc: Document) -> Any:
    line = node.start_mark.line + 1
    doc.lines.setdefault(path, line)
    if node.tag not in _PLAIN_TAGS:
        raise ConfigError(_at(doc.source, line, path, f"YAML tag {node.tag!r} is not allowed "
                              "(only strings, numbers, booleans, null, lists and mappings)"))
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _PLAIN_TAGS:
                raise ConfigError(_at(doc.source, key_node.start_mark.line + 1, path,
                                      "keys must be plain strings or numbers"))
            key = loader.construct_object(key_node)
            if key in out:
                raise ConfigError(_at(doc.source, key_node.start_mark.line + 1, (*path, key),
                                      f"duplicate key (first at line {doc.lines[(*path, key)]})"))
            doc.lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _build(loader, value_node, (*path, key), doc)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, (*path, i), doc) for i, item in enumerate(node.value)]
    return loader.construct_object(node)
