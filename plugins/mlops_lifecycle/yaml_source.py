"""Reading a model-line file strictly, and knowing where each value came from.

A model-line file is small, plain YAML written by people: UTF-8, at most ``MAX_BYTES``, one value per
key. So duplicate keys (YAML keeps the last one silently), anchors and aliases (``*name``: one line of
YAML can expand to gigabytes of parameters), and YAML's implicit dates (an impossible date like
2026-02-30 would fail inside the YAML parser, not in the schema) are refused or left to the schema,
each with the line and column. ``Source.where`` maps a field path back to its line and column for
the schema's messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 256 * 1024
TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_BASE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser: ~10x faster than pure Python


class YamlProblem(ValueError):
    """What is wrong with the file as YAML, with the line and column where known."""


def _mark(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class _StrictLoader(_BASE):  # type: ignore[misc,valid-type]
    """Safe loading without implicit timestamps, duplicate keys or aliases."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != TIMESTAMP_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if node in self.constructed_objects:  # the same node a second time: an alias
            raise YamlProblem(f"{_mark(node.start_mark)}: YAML aliases (*name) are not allowed in a model-line file")
        return super().construct_object(node, deep=deep)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[str, str], Any] = {}
        for key_node, _ in node.value:
            key = (key_node.tag, str(key_node.value))
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlProblem(f"{_mark(key_node.start_mark)}: YAML merge keys (<<) are not allowed")
            if key in seen:
                raise YamlProblem(
                    f"{_mark(key_node.start_mark)}: duplicate key '{key_node.value}' (first at "
                    f"{_mark(seen[key])}); YAML would silently keep only the last one"
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True)
class Source:
    """A parsed file: its data and its node tree (for positions)."""

    data: Any
    root: yaml.Node | None

    def where(self, parts: list[str], key: bool = False) -> str:
        """'line L, column C' of the value at ``parts`` (of its key, with ``key``), or of the nearest parent found."""
        node, mark = self.root, self.root.start_mark if self.root is not None else None
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, yaml.MappingNode):
                found = next(((k, v) for k, v in node.value if str(k.value) == part), None)
                if found is None:
                    break
                node, mark = found[1], (found[0].start_mark if key and last else found[1].start_mark)
            elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
                node = node.value[int(part)]
                mark = node.start_mark
            else:
                break
        return _mark(mark)


def read(path: Path) -> Source:
    """Read ``path`` as a model-line file; raise :class:`YamlProblem` (or OSError) saying what is wrong."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise YamlProblem(f"file is {size} bytes; a model-line file is at most {MAX_BYTES} bytes")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise YamlProblem(
            f"line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the file as UTF-8"
        ) from None
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        where = _mark(exc.problem_mark)
        raise YamlProblem(f"{where + ': ' if where else ''}not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return Source(data, root)
