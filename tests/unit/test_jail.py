"""The jail's logic (kata_py/vmm/jail.py) against a fake system-call layer:
the argv it rewrites, the root it builds, the order in which privileges go."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from kata_py.vmm import jail


class FakeSyscalls:
    """Records every call; a tree of made paths stands in for the file system."""

    def __init__(self, host_pid: int = 4242, dirs: set[str] = frozenset(), fail: str | None = None) -> None:
        self.calls: list[tuple] = []
        self.made: set[str] = set()
        self.host_dirs = set(dirs)
        self.pid = host_pid
        self.fail = fail
        self.gone = False

    def _record(self, *call) -> None:
        if self.fail and call[0] == self.fail:
            raise OSError(1, f"{self.fail}: Operation not permitted")
        self.calls.append(call)

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]

    def mount(self, source, target, fstype, flags, data=""):
        self._record("mount", source, target, fstype, flags, data)

    def umount(self, target, flags):
        self._record("umount", target, flags)

    def pivot_root(self, new, old):
        self._record("pivot_root", new, old)

    def prctl(self, option, arg):
        self._record("prctl", option, arg)

    def capset_none(self):
        self._record("capset_none")

    def sethostname(self, name):
        self._record("sethostname", name)

    def last_cap(self):
        return 40

    def host_pid(self):
        return self.pid

    def owner_gone(self):
        self._record("owner_gone")
        return self.gone

    def mkdir(self, path, mode):
        self._record("mkdir", path, mode)
        self.made.add(path)

    def mknod(self, path, mode, device):
        self._record("mknod", path, mode, device)
        self.made.add(path)

    def chown(self, path, uid, gid):
        self._record("chown", path, uid, gid)

    def chmod(self, path, mode):
        self._record("chmod", path, mode)

    def chdir(self, path):
        self._record("chdir", path)

    def setgroups(self, groups):
        self._record("setgroups", tuple(groups))

    def setresgid(self, *ids):
        self._record("setresgid", *ids)

    def setresuid(self, *ids):
        self._record("setresuid", *ids)

    def umask(self, mask):
        self._record("umask", mask)
        return 0o177

    def touch(self, path):
        self._record("touch", path)
        self.made.add(path)

    def is_dir(self, path):
        return path in self.host_dirs

    def exists(self, path):
        return path in self.made

    def execv(self, path, argv):
        self._record("execv", path, tuple(argv))


def spec(**extra) -> jail.JailSpec:
    values = dict(root="/run/vm/root", binary="/usr/bin/qemu-system-x86_64", argv=["qemu-system-x86_64", "-x"],
                  ro_binds=["/usr/bin/qemu-system-x86_64", "/lib/x86_64-linux-gnu", "/img/vmlinux"],
                  rw_files=["/run/vm/console.log"], devices=["null", "urandom", "kvm"])
    values.update(extra)
    return jail.JailSpec(**values)


def test_uid_is_derived_from_the_host_pid_and_never_root():
    assert jail.jail_id(1) == jail.UID_BASE + 1 > 0
    assert jail.jail_id(4194304) < 2**32 - 1    # the largest pid_max still gives a valid uid


def test_option_strings_round_trip_doubled_commas():
    parts = jail.split_options("local,id=fs,path=/a,,b,readonly=on")
    assert parts == ["local", "id=fs", "path=/a,b", "readonly=on"]
    assert jail.join_options(parts) == "local,id=fs,path=/a,,b,readonly=on"


def test_root_is_a_tmpfs_with_read_only_binds_devices_and_a_pivot():
    fake = FakeSyscalls(dirs={"/lib/x86_64-linux-gnu"})
    uid = jail.jail_id(fake.pid)
    jail.build_root(spec(), uid, fake)
    calls = fake.calls
    # Nothing it mounts may reach the host: the first call makes everything private.
    assert calls[0] == ("mount", "", "/", "", jail.MS_REC | jail.MS_PRIVATE, "")
    assert calls[1][:4] == ("mount", "tmpfs", "/run/vm/root", "tmpfs")
    binds = [c for c in calls if c[0] == "mount" and c[4] & jail.MS_BIND and not c[4] & jail.MS_REMOUNT]
    assert [c[2] for c in binds] == ["/run/vm/root/usr/bin/qemu-system-x86_64", "/run/vm/root/lib/x86_64-linux-gnu",
                                     "/run/vm/root/img/vmlinux", "/run/vm/root/run/vm/console.log"]
    remounts = [c for c in calls if c[0] == "mount" and c[4] & jail.MS_REMOUNT and c[4] & jail.MS_BIND]
    for remount in remounts[:3]:
        assert remount[4] & jail.MS_RDONLY and remount[4] & jail.MS_NOSUID
    assert not remounts[3][4] & jail.MS_RDONLY          # the console log is written
    # A directory source gets a directory mount point, a file a file.
    assert ("mkdir", "/run/vm/root/lib/x86_64-linux-gnu", 0o755) in calls
    assert ("touch", "/run/vm/root/img/vmlinux") in calls
    # The console log is the jail's own; the kvm node too, null is everybody's.
    assert ("chown", "/run/vm/console.log", uid, uid) in calls
    assert ("chown", "/run/vm/root/dev/kvm", uid, uid) in calls
    assert not any(c[0] == "chown" and c[1].endswith("/null") for c in calls)
    nodes = {c[1]: c for c in calls if c[0] == "mknod"}
    assert set(nodes) == {"/run/vm/root/dev/null", "/run/vm/root/dev/urandom", "/run/vm/root/dev/kvm"}
    assert stat.S_ISCHR(nodes["/run/vm/root/dev/kvm"][2]) and nodes["/run/vm/root/dev/kvm"][3] == os.makedev(10, 232)
    # pivot, detach the old root, then seal the new one read-only.
    tail = fake.names()[-5:]
    assert tail == ["chdir", "pivot_root", "umount", "chdir", "mount"]
    assert calls[-1][4] & jail.MS_RDONLY and calls[-1][4] & jail.MS_REMOUNT


def test_privileges_go_bounding_set_first_then_ids_then_no_new_privs():
    fake = FakeSyscalls()
    jail.drop_privileges(1000, fake)
    names = fake.names()
    drops = [c for c in fake.calls if c[0] == "prctl" and c[1] == jail.PR_CAPBSET_DROP]
    assert [c[2] for c in drops] == list(range(41))
    # The bounding set needs CAP_SETPCAP: it goes while we are still root.
    assert names.index("setresuid") > max(i for i, c in enumerate(fake.calls) if c in drops)
    assert names.index("setgroups") < names.index("setresgid") < names.index("setresuid") < names.index("capset_none")
    assert ("setresuid", 1000, 1000, 1000) in fake.calls and ("setgroups", ()) in fake.calls
    assert fake.calls[-1] == ("prctl", jail.PR_SET_NO_NEW_PRIVS, 1)


def test_become_qemu_execs_only_after_the_jail_is_built_and_privileges_dropped():
    fake = FakeSyscalls(host_pid=77)
    jail.become_qemu(spec(), fake)
    names = fake.names()
    assert names[-1] == "execv" and fake.calls[-1][1] == "/usr/bin/qemu-system-x86_64"
    assert names.index("pivot_root") < names.index("setresuid") < names.index("execv")
    assert ("setresuid", jail.jail_id(77), jail.jail_id(77), jail.jail_id(77)) in fake.calls
    # The uid change cleared the parent-death signal: set again, and the owner checked, after it.
    assert names.index("setresuid") < fake.calls.index(("prctl", jail.PR_SET_PDEATHSIG, 9)) \
        < names.index("owner_gone") < names.index("execv")


def test_no_exec_when_the_owner_died_meanwhile():
    fake = FakeSyscalls()
    fake.gone = True
    with pytest.raises(jail.JailError, match="owner"):
        jail.become_qemu(spec(), fake)
    assert "execv" not in fake.names()


@pytest.mark.parametrize("step", ["pivot_root", "setresuid", "mknod", "prctl"])
def test_a_failed_step_never_reaches_exec(step):
    fake = FakeSyscalls(fail=step)
    with pytest.raises(OSError):
        jail.become_qemu(spec(), fake)
    assert "execv" not in fake.names()


def test_argv_paths_become_fds_and_binds(tmp_path, monkeypatch):
    monkeypatch.setattr(jail, "runtime_paths", lambda binary: ("/lib/x86_64-linux-gnu",))
    backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend.bind(str(tmp_path / "vhost.sock"))
    backend.listen(1)
    argv = ["qemu-system-x86_64", "-name", "vm",
            "-kernel", "/img/vmlinux", "-initrd", "/img/initrd",
            "-drive", "file=/img/root,,fs.erofs,if=none,id=rootfs,format=raw,readonly=on",
            "-chardev", f"file,id=console,path={tmp_path}/console.log",
            "-chardev", f"socket,id=vsock0,path={tmp_path}/vhost.sock",
            "-device", "vhost-user-vsock-device,chardev=vsock0",
            "-qmp", f"unix:{tmp_path}/qmp.sock,server=on,wait=off",
            "-nodefaults"]
    prepared = jail.prepare(argv, tmp_path / "root", "kvm")
    try:
        out = prepared.spec.argv
        assert out[0] == "qemu-system-x86_64" and out[-1] == "-nodefaults"
        assert {"/img/vmlinux", "/img/initrd", "/img/root,fs.erofs"} <= set(prepared.spec.ro_binds)
        assert prepared.spec.rw_files == [f"{tmp_path}/console.log"]
        assert "kvm" in prepared.spec.devices
        vsock = out[out.index("-device") - 1]
        assert vsock.startswith("socket,id=vsock0,fd=") and "path=" not in vsock
        assert int(vsock.rsplit("=", 1)[1]) in prepared.pass_fds
        conn, _ = backend.accept()      # connected by prepare, as root, before QEMU runs
        conn.close()
        qmp = out[out.index("-mon") - 1]
        assert qmp.startswith("socket,id=qmp-") and "server=on" in qmp and "wait=off" in qmp
        assert stat.S_ISSOCK(os.stat(tmp_path / "qmp.sock").st_mode)
        assert oct(os.stat(tmp_path / "qmp.sock").st_mode & 0o777) == "0o600"
    finally:
        jail.release(prepared)
        backend.close()
    assert prepared.closers == []


def test_a_back_end_that_is_not_listening_is_an_error_and_nothing_stays_open(tmp_path, monkeypatch):
    monkeypatch.setattr(jail, "runtime_paths", lambda binary: ())
    before = set(os.listdir("/proc/self/fd"))
    argv = ["qemu-system-x86_64", "-qmp", f"unix:{tmp_path}/qmp.sock,server=on,wait=off",
            "-chardev", f"socket,id=vsock0,path={tmp_path}/absent.sock"]
    with pytest.raises(jail.JailError, match="absent.sock"):
        jail.prepare(argv, tmp_path / "root", "tcg")
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_9p_export_goes_through_the_proxy_helper(tmp_path, monkeypatch):
    monkeypatch.setattr(jail, "runtime_paths", lambda binary: ())
    export = tmp_path / "export"
    export.mkdir()
    argv = ["qemu-system-x86_64", "-fsdev",
            f"local,id=fs-x,path={export},security_model=passthrough,multidevs=remap,readonly=on",
            "-device", "virtio-9p-device,fsdev=fs-x,mount_tag=x"]
    prepared = jail.prepare(argv, tmp_path / "root", "tcg")
    try:
        fsdev = prepared.spec.argv[2]
        assert fsdev.startswith("proxy,id=fs-x,sock_fd=") and fsdev.endswith(",readonly=on")
        assert str(export) not in " ".join(prepared.spec.argv)
        helper = prepared.helpers[0]
        assert helper.proc.poll() is None
        assert os.readlink(f"/proc/{helper.pid}/exe") == jail.PROXY_HELPER
    finally:
        jail.release(prepared)
    assert helper.proc is None


def test_the_switch_defaults_to_on(monkeypatch):
    monkeypatch.delenv("KATA_PY_JAIL", raising=False)
    assert jail.enabled()
    monkeypatch.setenv("KATA_PY_JAIL", "off")
    assert not jail.enabled()


def test_a_jailed_process_wakes_its_waiter_whoever_reaps_it():
    import asyncio
    import signal
    import time

    pid = os.fork()
    if pid == 0:
        time.sleep(0.2)
        os._exit(3)

    async def go():
        process = jail.JailedProcess(pid)
        waiter = asyncio.ensure_future(process.wait())
        await asyncio.sleep(0)
        while process.returncode is None:       # a poll (alive()) reaps it first
            await asyncio.sleep(0.05)
        return await asyncio.wait_for(waiter, 5), process

    code, process = asyncio.run(go())
    assert code == 3 and process.returncode == 3
    process.send_signal(signal.SIGTERM)          # gone: a no-op, never a signal to a reused pid
