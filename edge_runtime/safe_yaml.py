"""Strict YAML for files the device trusts: bundle manifests and station files.

PyYAML's SafeLoader constructs no objects, but it still expands aliases (a 9 kB "billion laughs" ladder of
anchors and aliases grows to gigabytes) and lets a repeated key silently replace an earlier one (an appended
`http: {host: 0.0.0.0}` wins). Neither has a legitimate use in these files, so both are refused here, with the
file, the key or anchor, and the line.
"""
from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

# Longest repr of an offending value quoted in an error message: enough to recognise it, never a 500 MB log line.
MAX_VALUE_REPR = 200
# Longest error message the runtime produces from untrusted input (the value repr plus file, key and context).
MAX_MESSAGE = 2000


def short_repr(value: Any, limit: int = MAX_VALUE_REPR) -> str:
    """repr(value) cut to `limit` characters (with the original length), safe for any size of value."""
    if isinstance(value, (str, bytes, bytearray)) and len(value) > 4 * limit:
        value = value[:4 * limit]  # do not build the repr of a huge string only to cut it
        text = repr(value)
    else:
        try:
            text = repr(value)
        except Exception as exc:  # a repr that fails must not hide the original error
            return f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters shown as {limit})"


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message` cut to `limit` characters, keeping its start and end (file and key first, reason last)."""
    if len(message) <= limit:
        return message
    half = (limit - 40) // 2
    return f"{message[:half]} ...[{len(message) - 2 * half} characters cut]... {message[-half:]}"


class YamlRefused(ValueError):
    """The document is valid YAML but uses a construct this runtime refuses (alias, anchor, duplicate key)."""


class StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and duplicate mapping keys (at any depth), naming the line."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise YamlRefused(f"line {event.start_mark.line + 1}: YAML alias *{short_repr(event.anchor, 60)[1:-1]} "
                              "is not allowed (aliases and anchors are refused in this file)")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise YamlRefused(f"line {event.start_mark.line + 1}: YAML anchor &{short_repr(anchor, 60)[1:-1]} "
                              "is not allowed (aliases and anchors are refused in this file)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise YamlRefused(f"line {key_node.start_mark.line + 1}: YAML merge key '<<' is not allowed")
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (ConstructorError, TypeError):
                    continue  # the base class reports unhashable keys with its own message
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise YamlRefused(f"line {line}: duplicate key {short_repr(key, 80)} (first at line {seen[key]}); "
                                      "a repeated key would silently replace the earlier value")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


    def construct_yaml_int(self, node: Any) -> int:
        _refuse_yaml11_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: Any) -> float:
        _refuse_yaml11_number(node)
        return super().construct_yaml_float(node)


def _refuse_yaml11_number(node: Any) -> None:
    """YAML 1.1 (PyYAML) reads `20:00` as the base-60 number 1200 and `0755` as the octal 493; whoever wrote them
    meant a time, a mode or 755, and YAML 1.2 and JSON read neither so. Refused, naming the line, never
    reinterpreted in silence (probe 73's leftover: `deadline_ms: 0250` ran as 168 ms)."""
    text = str(node.value).replace("_", "").lstrip("+-")
    if ":" in text or (len(text) > 1 and text[0] == "0" and text[1:].isdigit()):
        raise YamlRefused(f"line {node.start_mark.line + 1}: {short_repr(node.value, 40)} is a base-60 or octal "
                          "number in YAML 1.1; write the plain decimal number, or quote it if it is text")


StrictSafeLoader.add_constructor("tag:yaml.org,2002:int", StrictSafeLoader.construct_yaml_int)
StrictSafeLoader.add_constructor("tag:yaml.org,2002:float", StrictSafeLoader.construct_yaml_float)

# Mappings built by SafeConstructor go through construct_yaml_map -> construct_mapping, so the checks above apply
# to every level; nothing else needs registering.


def load_strict(data: str | bytes, name: str) -> Any:
    """Parse one YAML document with StrictSafeLoader.

    Returns the plain Python value. Raises YamlRefused (alias, anchor, merge key, duplicate key) or
    yaml.YAMLError / ValueError / RecursionError from the parser; messages from this module name `name`.
    """
    # What yaml.load(data, Loader=...) does, spelled out so that no call site of yaml.load exists in the runtime.
    loader = StrictSafeLoader(data)
    try:
        return loader.get_single_data()
    except YamlRefused as exc:
        raise YamlRefused(clip(f"{name}: {exc}")) from None
    finally:
        loader.dispose()
