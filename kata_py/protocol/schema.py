"""A small JSON-schema validator for the protocol's own schemas.

The guest image carries only the standard library, so it cannot use the
`jsonschema` package; both ends use this validator so they agree exactly on
what is valid. It understands the subset of draft 2020-12 that the protocol's
schemas use: type, properties, required, additionalProperties, items,
minItems/maxItems, minLength/maxLength, minimum/maximum, enum, pattern.
A unit test checks it against `jsonschema` on the real message schemas.
"""

from __future__ import annotations

import re

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}

_KNOWN = {"type", "properties", "required", "additionalProperties", "items", "minItems",
          "maxItems", "minLength", "maxLength", "minimum", "maximum", "enum", "pattern",
          "description", "$schema", "$id", "title"}


class SchemaError(ValueError):
    """A value does not match its schema. `path` names where, JSON-pointer style."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path or "/"
        super().__init__(f"{self.path}: {message}")


def validate(value, schema: dict, path: str = "") -> None:
    unknown = set(schema) - _KNOWN
    if unknown:
        # A schema keyword we silently ignored would make a check pass that should fail.
        raise SchemaError(path, f"schema uses unsupported keywords {sorted(unknown)}")
    expected = schema.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        if not any(_TYPES[name](value) for name in names):
            raise SchemaError(path, f"expected {' or '.join(names)}, got {_type_name(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(path, f"{value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise SchemaError(path, f"string shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaError(path, f"string longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise SchemaError(path, f"{value[:64]!r} does not match {schema['pattern']}")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(path, f"{value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(path, f"{value} is above the maximum {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise SchemaError(path, f"fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise SchemaError(path, f"more than {schema['maxItems']} items")
        if "items" in schema:
            for index, item in enumerate(value):
                validate(item, schema["items"], f"{path}/{index}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                raise SchemaError(path, f"missing required property {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                validate(item, properties[name], f"{path}/{name}")
            elif extra is False:
                raise SchemaError(path, f"unexpected property {name[:64]!r}")
            elif isinstance(extra, dict):
                validate(item, extra, f"{path}/{name}")


def _type_name(value) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[name](value):
            return name
    return type(value).__name__
