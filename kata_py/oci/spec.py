"""Load and validate a bundle's config.json.

Validation is the official runtime-spec JSON schemas (Debian's
golang-github-opencontainers-specs-dev) through `jsonschema`, then the
semantic checks a schema cannot express. Every error names the JSON path.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError

SCHEMA_DIR = Path(os.environ.get("KATA_PY_OCI_SCHEMA_DIR",
                                 "/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema"))
MAX_CONFIG_BYTES = 4 << 20  # runc has no limit; a 4 MiB config is already absurd
SUPPORTED_MAJOR = 1


@lru_cache(maxsize=1)
def _validator():
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    if not (SCHEMA_DIR / "config-schema.json").exists():
        raise ConfigError(f"the OCI runtime-spec schemas are missing from {SCHEMA_DIR} "
                          "(Debian package golang-github-opencontainers-specs-dev)")
    resources = []
    for path in SCHEMA_DIR.glob("*.json"):
        resources.append((path.as_uri(), Resource.from_contents(json.loads(path.read_text()), DRAFT4)))
    registry = Registry().with_resources(resources)
    root = dict(json.loads((SCHEMA_DIR / "config-schema.json").read_text()))
    root["id"] = (SCHEMA_DIR / "config-schema.json").as_uri()  # draft-4 base URI for relative $refs
    return jsonschema.Draft4Validator(root, registry=registry)


def json_path(parts) -> str:
    return "/" + "/".join(str(p) for p in parts) if parts else "/"


def validate_config(config) -> None:
    import jsonschema

    validator = _validator()
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        path, message = list(best.absolute_path), best.message
        if best.validator == "required" and isinstance(best.instance, dict):
            # Name the missing member itself, not the object that lacks it.
            missing = [key for key in best.validator_value if key not in best.instance]
            if missing:
                path, message = path + [missing[0]], "required, but missing"
        raise ConfigError(f"config.json {json_path(path)}: {_short(message)}")
    _semantic_checks(config)


def _short(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[:limit] + "..."


def _semantic_checks(config: dict) -> None:
    version = config.get("ociVersion", "")
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) != SUPPORTED_MAJOR:
        raise ConfigError(f"config.json /ociVersion: unsupported version {version!r} (need {SUPPORTED_MAJOR}.x)")
    if "root" not in config:
        raise ConfigError("config.json /root: required on Linux")
    process = config.get("process")
    if process is not None:
        if not process.get("args"):
            raise ConfigError("config.json /process/args: must name a program")
        if not str(process.get("cwd", "")).startswith("/"):
            raise ConfigError("config.json /process/cwd: must be an absolute path")
    namespaces = config.get("linux", {}).get("namespaces", [])
    seen = set()
    for index, ns in enumerate(namespaces):
        if ns["type"] in seen:
            raise ConfigError(f"config.json /linux/namespaces/{index}: namespace {ns['type']!r} given twice")
        seen.add(ns["type"])
    for index, mount in enumerate(config.get("mounts", [])):
        if not mount.get("destination", "").startswith("/"):
            raise ConfigError(f"config.json /mounts/{index}/destination: must be an absolute path")
        if ".." in Path(mount["destination"]).parts:
            raise ConfigError(f"config.json /mounts/{index}/destination: must not contain '..'")


def load_bundle(bundle: str | os.PathLike) -> tuple[Path, dict, Path]:
    """(bundle dir, validated config, rootfs dir) or ConfigError."""
    bundle_dir = Path(bundle).resolve()
    config_path = bundle_dir / "config.json"
    try:
        with open(config_path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: no such file (is --bundle right?)") from None
    except OSError as exc:
        raise ConfigError(f"{config_path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{config_path}: larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        config = json.loads(raw)
    except UnicodeDecodeError:
        raise ConfigError(f"{config_path}: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{config_path}: JSON nested too deeply") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config.json /: expected an object, got {type(config).__name__}")
    validate_config(config)
    return bundle_dir, config, resolve_rootfs(bundle_dir, config["root"]["path"])


def resolve_rootfs(bundle_dir: Path, root_path: str) -> Path:
    """The rootfs directory. A relative root.path must stay inside the bundle
    after symlinks are resolved: a rootfs link pointing out is refused."""
    candidate = Path(root_path)
    if candidate.is_absolute():
        resolved = candidate.resolve()
    else:
        resolved = (bundle_dir / candidate).resolve()
        if resolved != bundle_dir and bundle_dir not in resolved.parents:
            raise ConfigError(f"config.json /root/path: {root_path!r} resolves outside the bundle ({resolved})")
    if not resolved.is_dir():
        raise ConfigError(f"config.json /root/path: {resolved} is not a directory")
    return resolved
