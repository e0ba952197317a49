"""Dataclasses as the JSON objects they stand for, and back: the run record's encoding.

`to_json_object` writes fields in declaration order and leaves out optional keys that have no value;
`from_json_object` builds nested dataclasses (and lists of them) back from parsed JSON, and names any
key it does not know.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, TypeVar

from lorafit.base.errors import UserError

T = TypeVar("T")


def optional_key(**kw: Any) -> Any:
    """A key written only when it has a value (e.g. `energy_source` only when energy was measured)."""
    return field(default=None, metadata={"omit_if_none": True}, **kw)


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_json_object(value)
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def to_json_object(obj: Any) -> dict[str, Any]:
    """A dataclass as the JSON object it stands for: fields in order, optional keys only when set."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.metadata.get("omit_if_none"):
            continue
        out[f.name] = _encode(value)
    return out


def _decode(tp: Any, value: Any) -> Any:
    """`value` (parsed JSON) as type `tp`: nested dataclasses and lists of them are built, the rest kept."""
    if value is None:
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_json_object(tp, value)
    if typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_decode(item, v) for v in value]
    return value


def from_json_object(cls: type[T], data: dict[str, Any], where: str = "summary.json") -> T:
    """A dataclass from its JSON object; keys it does not know are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {cls.__name__}", file=where)
    return cls(**{k: _decode(hints[k], v) for k, v in data.items()})
