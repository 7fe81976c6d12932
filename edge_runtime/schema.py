"""A small validator that turns YAML mappings into typed dataclasses, so errors name the file and the key.

Why not pydantic: the device install stays at numpy/onnxruntime/opencv/hnswlib/pyyaml, and the station schema
needs only dataclasses, Literal, Optional, lists and tagged unions chosen by a `type` key.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from edge_runtime.registry import registry_of
from edge_runtime.safe_yaml import clip, short_repr


class ConfigError(ValueError):
    """Invalid configuration: the message names the file and the dotted key (bounded in length)."""

    def __init__(self, message: str) -> None:
        super().__init__(clip(str(message)))


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}.get(tp.__name__, tp.__name__)
    return str(tp)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _yaml_bool_hint(value: Any) -> str:
    # YAML 1.1 (PyYAML) reads unquoted yes/no/on/off/true/false as booleans, so `fsync: no` arrives as False.
    if isinstance(value, bool):
        return " (YAML reads an unquoted yes, no, on, off, true or false as a boolean: quote the word you meant)"
    return ""


# What YAML 1.2 and JSON read as a number but PyYAML (YAML 1.1) reads as a string: an exponent without a '.' in the
# mantissa or a sign after the 'e' (1e3, 2.5e3; 1.0e+3 is a number).
_YAML11_STRING_NUMBER = re.compile(r"([-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?)[eE]([-+]?)([0-9]+)")


def _yaml_number_hint(value: Any, integer: bool = False) -> str:
    # probe 73: `deadline_ms: 1e3` was refused as "expected a number, got '1e3'", a number to whoever wrote it.
    match = _YAML11_STRING_NUMBER.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or not any(c.isdigit() for c in match.group(1)):
        return ""
    if integer:
        return " (YAML reads this exponent as a string: write the plain integer)"
    mantissa, sign, exponent = match.groups()
    spelled = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{sign or '+'}{exponent}"
    return f" (YAML reads this exponent as a string: write {spelled} or the plain number)"


def convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; return it converted (mappings become dataclasses)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    registry = registry_of(tp)
    if registry is not None:     # a source or output: the adapters registered when the file is read
        if value is None:
            raise ConfigError(f"{where}: must not be empty")
        return _tagged(value, list(registry.configs()), where)
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in get_args(tp):
                return None
            raise ConfigError(f"{where}: must not be empty")
        tagged = [a for a in args if dataclasses.is_dataclass(a) and "type" in {f.name for f in dataclasses.fields(a)}]
        if len(tagged) > 1:
            return _tagged(value, tagged, where)
        errors = []
        for arg in args:
            try:
                return convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {short_repr(value)}")
    if origin is Literal:
        # Same type as well as equal: 1.0 == 1 and True == 1, but mqtt's qos 1.0 validated and then killed the sender
        # thread at its first publish (paho shifts it as an int; probe 102).
        if not any(value == arg and type(value) is type(arg) for arg in get_args(tp)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {short_repr(value)}{_yaml_bool_hint(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        (item_tp, *rest) = get_args(tp) or (Any,)
        items = [convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is tuple:
            if rest and rest[0] is not Ellipsis and len(items) != len(get_args(tp)):
                raise ConfigError(f"{where}: expected {len(get_args(tp))} items, got {len(items)}")
            return tuple(items)
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short_repr(value)}")
        _, val_tp = get_args(tp)
        return {str(k): convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}{_yaml_number_hint(value, integer=True)}")
        if abs(value) > 2**63 - 1:
            raise ConfigError(f"{where}: integer {value} is out of range")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {short_repr(value)}{_yaml_number_hint(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {short_repr(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {short_repr(value)}{_yaml_bool_hint(value)}")
        return value
    raise TypeError(f"schema type {tp!r} at {where} is not supported")  # a bug in the schema, not the file


def _tagged(value: Any, choices: list, where: str) -> Any:
    if not isinstance(value, dict) or "type" not in value:
        raise ConfigError(f"{where}: expected a mapping with a 'type' key")
    by_tag = {}
    for cls in choices:
        tag_field = next(f for f in dataclasses.fields(cls) if f.name == "type")
        for tag in get_args(typing.get_type_hints(cls)["type"]) or (tag_field.default,):
            by_tag[tag] = cls
    tag = value["type"]
    cls = by_tag.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ConfigError(f"{where}.type: expected one of {', '.join(map(repr, by_tag))}, got {short_repr(value['type'])}")
    return from_mapping(cls, value, where)


def from_mapping(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys, missing required keys and wrong types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {short_repr(data)}")
    hints = typing.get_type_hints(cls, include_extras=True)   # extras: a registry's annotation (convert)
    # Fields marked internal (metadata {"internal": True}) are set by the code, never by a file.
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {short_repr(unknown[0])} (allowed: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name in data:
            kwargs[name] = convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(_nested(where, str(exc), fields)) from None
    return obj


def _nested(where: str, message: str, fields: dict) -> str:
    """Join a validate() message to its key path once.

    'threads: ...' raised at '<station>.inference' becomes '<station>.inference.threads: ...'; a message
    spelled from the section itself ('inference.threads: ...' or 'inference: ...') is not prefixed twice.
    """
    section = where.rsplit(".", 1)[-1]
    if message.startswith(section + ".") or message.startswith(section + ":"):
        message = message[len(section) + 1:].lstrip()
    first = message.split(":", 1)[0]
    if ":" in message and " " not in first and re.split(r"[.\[]", first)[0] in fields:
        return f"{where}.{message}"
    return f"{where}: {message}"
