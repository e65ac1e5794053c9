"""containerd's protobuf messages for the shim, compiled from Debian's .proto files.

Why compiled here and not committed: the messages must be exactly those of the
containerd that drives us (Debian 12's 1.6.20, package
golang-github-containerd-containerd-dev), so the .proto files are read from
/usr/share/gocode/src unmodified, never hand-encoded or copied into the repo.

How: grpcio-tools' protoc (`python -m grpc_tools.protoc`) compiles the roots
below with `--include_imports` into one FileDescriptorSet, a single binary file
cached in the state directory (`$KATA_PY_PROTO_CACHE`, else
`<state dir>/protos`, beside the guest image) and named by
a SHA-256 over every input .proto (the whole import closure), the grpcio-tools
and protobuf versions and this module's format version. Any change to an input
gives a new name, so a stale build is never loaded and nothing needs deleting.
`python -m kata_py.shim.protos` builds it ahead of time (ci/setup.sh); the
shim otherwise builds it on first use (about a second, once).

Why a descriptor set loaded into a private DescriptorPool rather than
generated `_pb2.py` modules put on sys.path:
- the import names: protoc's Python generator names a module after its import
  path, `github.com/...` becomes the package `github.com`, which Python cannot
  import without renaming directories or rewriting the generated imports;
- the default pool: `_pb2` modules register their files in protobuf's global
  pool, where gogo's `google/rpc/status.proto` would collide ("duplicate file
  name") with googleapis-common-protos' copy once anything (grpcio-status)
  loads that. A private pool holds our copies beside anyone else's.
The classes are built by protobuf's own message factory from the descriptors,
which is all a modern `_pb2.py` does too; well-known types keep their helpers
(`Timestamp.FromDatetime`, `Any.Pack`). `load()` returns one module-like object
per .proto file with the attributes a `_pb2` module has: message classes,
enum wrappers, enum value constants and `DESCRIPTOR`.

The gogoproto options are resolved, not stripped: gogo's include directory is
on protoc's path (options of an unknown extension are kept as unknown fields
and mean nothing to Python).

ttrpc's own envelope (Request, Response, KeyValue) has no .proto in Debian's
golang-github-containerd-ttrpc-dev 1.1.1 (Go structs with protobuf tags, in
types.go), so it is written here from the protocol description and compiled
with the rest; its status is google.rpc.Status from gogo's googleapis.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import logging
import os
import re
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import DecodeError, Message

from kata_py.errors import KataError

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"  # bump when the set of roots or the build flags change

GOCODE = Path(os.environ.get("KATA_PY_GOCODE", "/usr/share/gocode/src"))

# The Debian packages whose .proto files are compiled, for error messages.
DEBIAN_PACKAGES = ("golang-github-containerd-containerd-dev", "golang-github-containerd-cgroups-dev",
                   "golang-github-gogo-protobuf-dev", "golang-github-gogo-googleapis-dev")

_CTRD = "github.com/containerd/containerd"
SHIM = f"{_CTRD}/runtime/v2/task/shim.proto"                     # containerd.task.v2
TASK_TYPES = f"{_CTRD}/api/types/task/task.proto"                 # containerd.v1.types
MOUNT = f"{_CTRD}/api/types/mount.proto"                          # containerd.types
EVENTS = f"{_CTRD}/api/events/task.proto"                         # containerd.events
EVENTS_SERVICE = f"{_CTRD}/api/services/ttrpc/events/v1/events.proto"  # ...events.ttrpc.v1
CGROUPS_V1 = "github.com/containerd/cgroups/stats/v1/metrics.proto"    # io.containerd.cgroups.v1
CGROUPS_V2 = "github.com/containerd/cgroups/v2/stats/metrics.proto"    # io.containerd.cgroups.v2
RPC_STATUS = "google/rpc/status.proto"                            # google.rpc (gogo googleapis)
TTRPC = "kata_py/shim/ttrpc.proto"                                # ttrpc (written below)

ROOTS = (SHIM, TASK_TYPES, MOUNT, EVENTS, EVENTS_SERVICE, CGROUPS_V1, CGROUPS_V2, RPC_STATUS, TTRPC)

# ttrpc's frame payloads, as github.com/containerd/ttrpc 1.1 defines them
# (field numbers and types from its protocol description / Go struct tags).
TTRPC_PROTO = """\
syntax = "proto3";

// The envelope of every ttrpc frame: a request names the service and method
// and carries the method's own message as bytes; a response carries a
// google.rpc.Status and the method's reply.
package ttrpc;

import "google/rpc/status.proto";

message Request {
  string service = 1;
  string method = 2;
  bytes payload = 3;
  int64 timeout_nano = 4;
  repeated KeyValue metadata = 5;
}

message Response {
  google.rpc.Status status = 1;
  bytes payload = 2;
}

message KeyValue {
  string key = 1;
  string value = 2;
}
"""

_IMPORT = re.compile(r'^\s*import\s+(?:weak\s+|public\s+)?"([^"]+)"\s*;', re.MULTILINE)


class ProtoBuildError(KataError):
    """The shim's protobuf messages could not be compiled or loaded."""


def _wkt_dir() -> Path:
    """grpcio-tools ships the well-known types (any, empty, timestamp, descriptor)."""
    import grpc_tools  # only for its location; protoc itself runs as a subprocess

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def include_dirs(gocode: Path = GOCODE) -> list[Path]:
    """protoc's search path, in order: well-known types first so that no other
    tree's copy of google/protobuf/*.proto is picked up."""
    return [_wkt_dir(), gocode, gocode / "github.com/gogo/protobuf",
            gocode / "github.com/gogo/googleapis"]


def _resolve(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        p = d / name
        if p.is_file():
            return p
    return None


def _closure(dirs: list[Path]) -> dict[str, bytes]:
    """Every .proto the roots pull in, by import name -> content: what the
    cache key must cover, since protoc reads all of them."""
    found: dict[str, bytes] = {TTRPC: TTRPC_PROTO.encode()}
    todo = [r for r in ROOTS if r != TTRPC] + _IMPORT.findall(TTRPC_PROTO)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _resolve(name, dirs)
        if path is None:
            raise ProtoBuildError(
                f"{name} not found under {', '.join(map(str, dirs))}; "
                f"install the Debian packages {' '.join(DEBIAN_PACKAGES)}")
        data = path.read_bytes()
        found[name] = data
        todo.extend(_IMPORT.findall(data.decode("utf-8", "replace")))
    return found


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError as err:
        raise ProtoBuildError(f"{dist} is not installed (pip install grpcio-tools)") from err


def cache_key(gocode: Path = GOCODE) -> str:
    """SHA-256 of everything that decides the compiled output."""
    h = hashlib.sha256()
    h.update(f"format {FORMAT_VERSION}\0grpcio-tools {_version('grpcio-tools')}\0"
             f"protobuf {_version('protobuf')}\0".encode())
    for name, data in sorted(_closure(include_dirs(gocode)).items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """Beside the guest image, in the state directory: containerd starts the
    shim with an environment of its own (no HOME under systemd)."""
    if env := os.environ.get("KATA_PY_PROTO_CACHE"):
        return Path(env)
    from .. import paths

    return paths.state_dir() / "protos"


def _compile(out: Path, gocode: Path) -> None:
    """Run protoc into `out` (a descriptor set with all imports)."""
    with tempfile.TemporaryDirectory(prefix="kata-py-protos-") as tmp:
        own = Path(tmp) / TTRPC
        own.parent.mkdir(parents=True)
        own.write_text(TTRPC_PROTO)
        argv = [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}",
                *(f"-I{d}" for d in include_dirs(gocode)),
                "--include_imports", f"--descriptor_set_out={out}", *ROOTS]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ProtoBuildError(f"protoc could not run: {err}") from err
        if proc.returncode != 0:
            raise ProtoBuildError(f"protoc failed ({proc.returncode}): {proc.stderr.strip()}")


def build(cache_dir: Path | None = None, *, force: bool = False, gocode: Path = GOCODE) -> Path:
    """Compile the descriptor set unless the cache already holds this key's;
    return its path. Concurrent builders (two shims starting at once) each
    write a private temporary file and rename it into place atomically."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"containerd-shim-{cache_key(gocode)[:32]}.binpb"
    if target.is_file() and not force:
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=".build-", suffix=".binpb")
    except OSError as err:
        raise ProtoBuildError(f"cannot write the proto cache {cache}: {err}"
                              " (set KATA_PY_PROTO_CACHE)") from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _compile(tmp, gocode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("compiled containerd protos into %s", target)
    return target


@dataclass(frozen=True)
class Protos:
    """The compiled messages, one module-like namespace per .proto file.

    shim: runtime/v2/task/shim.proto (CreateTaskRequest ... ShutdownRequest;
          DESCRIPTOR.services_by_name["Task"] lists the Task service's methods)
    task_types: api/types/task/task.proto (Status enum: UNKNOWN, CREATED, RUNNING,
          STOPPED, PAUSED, PAUSING; ProcessInfo)
    mount: api/types/mount.proto (Mount)
    events: api/events/task.proto (TaskCreate, TaskStart, TaskExit, TaskDelete,
          TaskExecAdded, TaskExecStarted, TaskPaused, TaskResumed, TaskOOM, ...)
    events_service: api/services/ttrpc/events/v1/events.proto (ForwardRequest, Envelope)
    cgroups_v1, cgroups_v2: containerd/cgroups metrics (Metrics) for Stats
    rpc_status: google/rpc/status.proto (Status)
    ttrpc: ttrpc's envelope (Request, Response, KeyValue)
    """

    pool: descriptor_pool.DescriptorPool
    shim: types.ModuleType
    task_types: types.ModuleType
    mount: types.ModuleType
    events: types.ModuleType
    events_service: types.ModuleType
    cgroups_v1: types.ModuleType
    cgroups_v2: types.ModuleType
    rpc_status: types.ModuleType
    ttrpc: types.ModuleType

    def message_class(self, full_name: str) -> type[Message]:
        """The class of a message by its full protobuf name (nested ones too)."""
        try:
            desc = self.pool.FindMessageTypeByName(full_name)
        except KeyError as err:
            raise ProtoBuildError(f"no message {full_name} in the compiled protos") from err
        return message_factory.GetMessageClass(desc)

    def pack_any(self, msg: Message) -> Message:
        """A google.protobuf.Any holding `msg` under its bare full name
        (`containerd.events.TaskExit`, `io.containerd.cgroups.v2.Metrics`):
        containerd 1.6's typeurl looks unregistered types up by exactly that
        name, and `Any.Pack` would prefix `type.googleapis.com/`."""
        any_cls = self.message_class("google.protobuf.Any")
        return any_cls(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())

    def unpack_any(self, any_msg: Message) -> Message:
        """The message inside an Any, whether its type URL is bare or prefixed."""
        name = any_msg.type_url.rsplit("/", 1)[-1]
        cls = self.message_class(name)
        try:
            return cls.FromString(any_msg.value)
        except DecodeError as err:
            raise ProtoBuildError(f"Any of type {name} does not decode: {err}") from err


def _module(pool: descriptor_pool.DescriptorPool, file_name: str) -> types.ModuleType:
    """The attributes a generated `_pb2` module has, built from the pool."""
    fdesc = pool.FindFileByName(file_name)
    mod = types.ModuleType(file_name.rsplit("/", 1)[-1].removesuffix(".proto") + "_pb2")
    mod.DESCRIPTOR = fdesc
    for name, desc in fdesc.message_types_by_name.items():
        setattr(mod, name, message_factory.GetMessageClass(desc))
    for name, edesc in fdesc.enum_types_by_name.items():
        setattr(mod, name, EnumTypeWrapper(edesc))
        for value in edesc.values:
            setattr(mod, value.name, value.number)
    return mod


def _pool_from(path: Path) -> descriptor_pool.DescriptorPool:
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for fproto in fds.file:  # --include_imports writes dependencies first
        pool.Add(fproto)
    for root in ROOTS:
        pool.FindFileByName(root)  # fails here, not later, if the set is incomplete
    return pool


@functools.lru_cache(maxsize=None)
def load(cache_dir: Path | None = None) -> Protos:
    """Build (once per input change) and load the shim's messages. Cached per
    process: every caller shares one pool, so messages from different callers
    (an Any packed by one, unpacked by another) agree."""
    path = build(cache_dir)
    try:
        pool = _pool_from(path)
    except (DecodeError, TypeError, KeyError) as err:  # a truncated or foreign file
        log.warning("proto cache %s unreadable (%s); rebuilding", path, err)
        try:
            pool = _pool_from(build(cache_dir, force=True))
        except (DecodeError, TypeError, KeyError) as err2:
            raise ProtoBuildError(f"compiled protos in {path} do not load: {err2}") from err2
    return Protos(pool=pool, shim=_module(pool, SHIM), task_types=_module(pool, TASK_TYPES),
                  mount=_module(pool, MOUNT), events=_module(pool, EVENTS),
                  events_service=_module(pool, EVENTS_SERVICE),
                  cgroups_v1=_module(pool, CGROUPS_V1), cgroups_v2=_module(pool, CGROUPS_V2),
                  rpc_status=_module(pool, RPC_STATUS), ttrpc=_module(pool, TTRPC))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kata_py.shim.protos",
                                     description="Compile containerd's shim protos into the cache.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"default: {default_cache_dir()}")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        path = build(args.cache_dir, force=args.force)
        load(args.cache_dir)
    except ProtoBuildError as err:
        print(f"kata_py.shim.protos: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
