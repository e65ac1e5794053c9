"""The protocol's own small JSON-schema validator, held against the jsonschema package."""

import json

import jsonschema

from kata_py.protocol.schema import SchemaError, validate


def assert_agrees_with_jsonschema(schema: dict, samples: list, label: str) -> None:
    """The schema is a valid Draft 2020-12 schema, and our validator accepts
    exactly the samples jsonschema accepts."""
    jsonschema.Draft202012Validator.check_schema(schema)
    reference = jsonschema.Draft202012Validator(schema)
    for sample in samples:
        ours = True
        try:
            validate(sample, schema)
        except SchemaError:
            ours = False
        assert ours == reference.is_valid(sample), (label, json.dumps(sample))
