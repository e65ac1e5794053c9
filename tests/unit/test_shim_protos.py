"""The shim's messages compiled from Debian's containerd protos: cache keying,
the error when the protos are missing, and what load() hands the Task service."""

from __future__ import annotations

import datetime
import shutil

import pytest

from kata_py.shim import protos
from kata_py.shim.protos import ProtoBuildError, load


def test_build_is_cached_by_content(tmp_path):
    first = protos.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert protos.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert list(tmp_path.iterdir()) == [first]  # no temporary files left behind


def test_key_covers_every_imported_proto(tmp_path):
    # A private copy of exactly the files protoc reads from the gocode tree.
    dirs = protos.include_dirs()
    gocode = tmp_path / "src"
    for name in protos._closure(dirs):
        src = protos._resolve(name, dirs[1:])
        if src is None:
            continue  # well-known types and our own ttrpc.proto
        dest = gocode / src.relative_to(protos.GOCODE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    before = protos.cache_key(gocode)
    assert before == protos.cache_key()
    gogo = gocode / "github.com/gogo/protobuf/gogoproto/gogo.proto"  # imported, not a root
    gogo.write_text(gogo.read_text() + "\n// changed\n")
    assert protos.cache_key(gocode) != before


def test_missing_protos_name_the_debian_packages(tmp_path):
    with pytest.raises(ProtoBuildError) as err:
        protos.build(tmp_path / "cache", gocode=tmp_path / "empty")
    assert "golang-github-containerd-containerd-dev" in str(err.value)


def test_a_corrupt_cache_file_is_rebuilt(tmp_path):
    target = protos.build(tmp_path)
    target.write_bytes(b"\xff" * 100)
    assert load(tmp_path).shim.StateRequest(id="x").id == "x"


def test_load_gives_the_task_service_messages():
    p = load()
    methods = {m.name for m in p.shim.DESCRIPTOR.services_by_name["Task"].methods}
    assert methods == {"State", "Create", "Start", "Delete", "Pids", "Pause", "Resume",
                       "Checkpoint", "Kill", "Exec", "ResizePty", "CloseIO", "Update", "Wait",
                       "Stats", "Connect", "Shutdown"}
    assert p.shim.DESCRIPTOR.package == "containerd.task.v2"
    assert p.task_types.Status.Name(p.task_types.PAUSED) == "PAUSED"
    req = p.shim.CreateTaskRequest(id="c", bundle="/b", terminal=True,
                                   rootfs=[p.mount.Mount(type="overlay", source="overlay")])
    assert p.shim.CreateTaskRequest.FromString(req.SerializeToString()) == req
    exit_ = p.events.TaskExit(container_id="c", pid=9, exit_status=137)
    exit_.exited_at.FromDatetime(datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc))
    assert exit_.exited_at.seconds == 1704153600


def test_any_uses_the_bare_type_names_containerd_resolves():
    p = load()
    stats = p.shim.StatsResponse()
    stats.stats.CopyFrom(p.pack_any(p.cgroups_v2.Metrics(memory=p.cgroups_v2.MemoryStat(usage=5))))
    assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"
    assert p.unpack_any(stats.stats).memory.usage == 5
    env = p.events_service.Envelope(namespace="k8s.io", topic="/tasks/exit",
                                    event=p.pack_any(p.events.TaskExit(container_id="c")))
    assert env.event.type_url == "containerd.events.TaskExit"
    assert p.unpack_any(p.events_service.ForwardRequest(envelope=env).envelope.event).container_id == "c"


def test_cli_builds(tmp_path, capsys):
    assert protos.main(["--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().startswith(str(tmp_path))
