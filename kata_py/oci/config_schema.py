"""The runtime-spec's config.json schema, compiled to plain Python once per schema version.

Checking a config with the `jsonschema` package means importing it and building
its validator from the schema files on every `create` (0.05 to 0.12 s, more
than the rest of the host-side work before the VM starts). Instead
`fastjsonschema` turns the schema files into a Python module the first time a
given set of files is seen; its source and bytecode are kept in the state
directory under the hash of those files, and every later `create` only loads
the bytecode (about 2 ms). The generated code needs nothing of fastjsonschema
at run time: the exception it raises is `SchemaFault`, handed to the module
before it runs.

`first_fault(config)` answers where the config breaks the schema, as a JSON
path, and how, or None.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import marshal
import os
import threading
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from .. import paths
from ..errors import ConfigError

# Bumped whenever the generation below changes, so a module written by an
# older kata-py is not taken for the current one.
GENERATION = "1"
_EXCEPTION_IMPORT = "from fastjsonschema import JsonSchemaValueException, JsonSchemaValuesException\n"
_COMPOSITES = ("anyOf", "oneOf")
_recent = threading.local()


class SchemaFault(Exception):
    """Raised by the generated validator, with fastjsonschema's arguments: the
    message, the failing value, its place (`data.key[3].key`), the schema it
    breaks and the rule. `before` is the fault raised just before this one in
    the same validation: for an anyOf or oneOf, that is the branch's own fault,
    which the generated code catches and drops."""

    def __init__(self, message, value=None, name=None, definition=None, rule=None):
        super().__init__(message)
        self.message, self.value, self.name, self.definition, self.rule = message, value, name, definition, rule
        self.before = getattr(_recent, "fault", None)
        _recent.fault = self


def first_fault(config, schema_dir: Path) -> tuple[list, str] | None:
    """(JSON path as a list of keys and indices, what is wrong there) for the
    first place `config` breaks the schema, or None when it does not."""
    validate = _validator(schema_dir)
    _recent.fault = None
    try:
        validate(config)
    except SchemaFault as fault:
        return _describe(fault, config)
    finally:
        _recent.fault = None
    return None


def _describe(fault: SchemaFault, config) -> tuple[list, str]:
    # A composite of one branch (linux.namespaces[] is anyOf one reference)
    # says only that no branch fits; the branch's own fault says why.
    while (fault.rule in _COMPOSITES and isinstance(fault.definition, dict)
           and len(fault.definition.get(fault.rule) or ()) == 1 and fault.before is not None):
        fault = fault.before
    path = locate(config, fault.name or "data", fault.value)
    if fault.rule == "required" and isinstance(fault.value, dict) and isinstance(fault.definition, dict):
        # Name the missing member itself, not the object that lacks it.
        missing = [key for key in fault.definition.get("required", ()) if key not in fault.value]
        if missing:
            return path + [missing[0]], "required, but missing"
    return path, _wording(fault)


def _wording(fault: SchemaFault) -> str:
    """The words `jsonschema` used for the rules a config breaks in practice, so
    the message is the one kata-py always gave; fastjsonschema's own otherwise."""
    value, rule = fault.value, fault.rule
    expected = fault.definition.get(rule) if isinstance(fault.definition, dict) else None
    if rule == "type" and expected is not None:
        names = ", ".join(map(repr, expected)) if isinstance(expected, list) else repr(expected)
        return f"{value!r} is not of type {names}"
    if rule == "minimum" and expected is not None:
        return f"{value!r} is less than the minimum of {expected!r}"
    if rule == "maximum" and expected is not None:
        return f"{value!r} is greater than the maximum of {expected!r}"
    if rule == "enum" and expected is not None:
        return f"{value!r} is not one of {expected!r}"
    if rule == "pattern" and expected is not None:
        return f"{value!r} does not match {expected!r}"
    message = fault.message
    if fault.name and message.startswith(fault.name + " "):
        message = message[len(fault.name) + 1:]
    return message


def locate(document, name: str, target) -> list:
    """The JSON path of fastjsonschema's `data.key[3].key`. A key may itself hold
    '.' or '[' (annotations do), so the path is found by walking the document,
    trying each key that fits the name, until the value there is the failing one."""
    rest = name[len("data"):] if name.startswith("data") else name
    found = None
    for path, node in _walk(document, rest, []):
        if node is target:
            return path
        found = path if found is None else found
    return found if found is not None else []


def _walk(node, rest: str, path: list):
    if not rest:
        yield path, node
    elif rest[0] == "[" and isinstance(node, list):
        close = rest.find("]")
        index = rest[1:close]
        if close > 1 and index.isdigit() and int(index) < len(node):
            yield from _walk(node[int(index)], rest[close + 1:], path + [int(index)])
    elif rest[0] == "." and isinstance(node, dict):
        for key, value in node.items():
            after = rest[1 + len(key):]
            if rest.startswith(key, 1) and (not after or after[0] in ".["):
                yield from _walk(value, after, path + [key])


@lru_cache(maxsize=4)
def _validator(schema_dir: Path):
    root = schema_dir / "config-schema.json"
    if not root.exists():
        raise ConfigError(f"the OCI runtime-spec schemas are missing from {schema_dir} "
                          "(Debian package golang-github-opencontainers-specs-dev)")
    digest = hashlib.sha256(GENERATION.encode())
    for path in sorted(schema_dir.glob("*.json")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    name = f"oci_config_schema_{digest.hexdigest()[:24]}"
    module = _load_cached(name) or _load_fresh(name, schema_dir)
    return getattr(module, module.ENTRY)


def _cache_dir() -> Path:
    return paths.state_dir() / "oci-schema"


def _trusted(path: Path) -> bool:
    # What is cached is run as code: only what this user wrote, that nobody else may change.
    try:
        for item in (path.parent, path):
            st = item.stat()
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


def _code_path(name: str) -> Path:
    # The bytecode is kept by hand rather than left to the import system, which
    # writes none under PYTHONDONTWRITEBYTECODE; its format changes with the
    # interpreter, whose magic number is in the name.
    return _cache_dir() / f"{name}.{importlib.util.MAGIC_NUMBER.hex()}.code"


def _load_cached(name: str):
    code_path = _code_path(name)
    if not _trusted(code_path):
        return None
    try:
        code = marshal.loads(code_path.read_bytes())
    except (OSError, EOFError, ValueError, TypeError):
        return None  # cut short by a crash mid-write: made again
    return _run(name, code)


def _run(name: str, code) -> ModuleType:
    module = ModuleType(name)
    module.JsonSchemaValueException = module.JsonSchemaValuesException = SchemaFault
    exec(code, module.__dict__)
    if not isinstance(getattr(module, "ENTRY", None), str):
        raise ConfigError(f"{_cache_dir()}: {name} is not a compiled OCI schema")
    return module


def _load_fresh(name: str, schema_dir: Path) -> ModuleType:
    """Generate the module, keep it (source, for reading, and bytecode) in the
    cache when the state directory takes it (one that does not still
    validates, only slower), and load it."""
    source = _generate(schema_dir)
    code = compile(source, str(_cache_dir() / f"{name}.py"), "exec")
    try:
        paths.ensure_private_dir(_cache_dir())
        _write_whole(_cache_dir() / f"{name}.py", source.encode())
        _write_whole(_code_path(name), marshal.dumps(code))
    except OSError:
        pass
    return _run(name, code)


def _write_whole(path: Path, data: bytes) -> None:
    # Whole or absent for a concurrent create.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _generate(schema_dir: Path) -> str:
    from urllib.parse import unquote, urlparse

    import fastjsonschema

    def load(uri: str):
        # The schemas refer to each other by relative path; nothing outside
        # their directory is read (no network, no other file).
        parsed = urlparse(uri)
        path = Path(unquote(parsed.path))
        if parsed.scheme != "file" or path.parent != schema_dir:
            raise ConfigError(f"the OCI runtime-spec schema refers to {uri}, outside {schema_dir}")
        return json.loads(path.read_text())

    root_path = schema_dir / "config-schema.json"
    root = dict(json.loads(root_path.read_text()))
    root["id"] = root_path.as_uri()  # draft-4 base URI for the relative $refs
    # use_default=False: the validator must not fill defaults into the config
    # it checks. fast_fail: the first fault is the one reported.
    source = fastjsonschema.compile_to_code(root, handlers={"file": load}, use_default=False)
    if _EXCEPTION_IMPORT not in source:
        raise ConfigError("fastjsonschema generated code of an unexpected shape (is the pinned version installed?)")
    entry = source.split("def ", 1)[1].split("(", 1)[0]
    return (source.replace(_EXCEPTION_IMPORT, "# JsonSchemaValueException: given by kata_py.oci.config_schema\n")
            + f"\nENTRY = {entry!r}\n")
