"""Type names users write in configs (``int``, ``decimal(12,2)``...) and their Arrow types."""

from __future__ import annotations

import re

import pyarrow as pa

_SIMPLE: dict[str, pa.DataType] = {
    "string": pa.string(),
    "str": pa.string(),
    "text": pa.string(),
    "int": pa.int64(),
    "integer": pa.int64(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float": pa.float64(),
    "double": pa.float64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "boolean": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
    "binary": pa.binary(),
}

_DECIMAL = re.compile(r"^decimal\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)$")

TYPE_NAMES = sorted([*_SIMPLE, "decimal(P,S)"])


def parse_type(name: str) -> pa.DataType:
    """Return the Arrow type for a type name; raise ``ValueError`` naming the valid names."""
    key = name.strip().lower()
    if key in _SIMPLE:
        return _SIMPLE[key]
    if key == "decimal":
        return pa.decimal128(38, 9)
    m = _DECIMAL.match(key)
    if m:
        precision, scale = int(m.group(1)), int(m.group(2))
        if not 1 <= precision <= 38 or scale > precision:
            raise ValueError(f"decimal precision must be 1..38 and scale <= precision: {name!r}")
        return pa.decimal128(precision, scale)
    raise ValueError(f"unknown type {name!r}; use one of: {', '.join(TYPE_NAMES)}")
