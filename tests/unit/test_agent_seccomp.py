"""OCI linux.seccomp compiled by the agent (seccomp.py, libseccomp through
ctypes) and loaded in forked children on the host: what the filtered program
sees, and the profiles build() refuses."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.agent_child import BUSYBOX, run, status_fields

from kata_agent import seccomp  # noqa: E402  (tests.agent_child put agent/ on the path)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loads filters and switches users: needs root")

DENY_MKDIR = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
              "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}


def python(script: str, profile: dict, security: dict | None = None, cwd: str = "/") -> tuple[int, str]:
    """Run a Python snippet under the compiled profile (root unless security says)."""
    return run([sys.executable, "-S", "-c", textwrap.dedent(script)], security, seccomp.build(profile), cwd)


@pytest.fixture
def shared_dir():
    """A directory uid 1000 can reach and write (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="kata-seccomp-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("nnp", [False, True], ids=["loaded-with-caps", "loaded-last-under-nnp"])
def test_denied_mkdir_fails_with_eperm(shared_dir, nnp):
    tmp_path = shared_dir
    security = {"user": {"uid": 1000, "gid": 1000}, "no_new_privileges": nnp,
                "capabilities": {"bounding": ["CAP_KILL"]}}
    status, out = run([BUSYBOX, "sh", "-c", "cat /proc/self/status; mkdir x; echo mkdir=$?; touch y; echo touch=$?"],
                      security, seccomp.build(DENY_MKDIR), cwd=str(tmp_path))
    assert status == 0, out
    assert "Operation not permitted" in out and "mkdir=1" in out and "touch=0" in out
    assert not (tmp_path / "x").exists() and (tmp_path / "y").exists()
    fields = status_fields(out)
    assert fields["Seccomp"] == "2" and fields["NoNewPrivs"] == ("1" if nnp else "0")


def test_errno_defaults_to_eperm_and_errnoret_is_returned(tmp_path):
    script = """
        import os
        for name in ("a", "b"):
            try:
                (os.mkdir if name == "a" else os.rmdir)(name)
            except OSError as exc:
                print(name, exc.errno)
    """
    os.mkdir(tmp_path / "b")
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"},
        {"names": ["rmdir", "unlinkat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS}]}
    status, out = python(script, profile, cwd=str(tmp_path))
    assert status == 0, out
    assert out.split("\n")[:2] == [f"a {errno.EPERM}", f"b {errno.EROFS}"]


def test_argument_conditions(tmp_path):
    script = """
        import os
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 9)
        os.dup2(null, 10)
        for fd, data in ((9, b"12345"), (9, b"1234"), (10, b"12345")):
            try:
                os.write(fd, data)
                print(fd, len(data), "ok")
            except OSError as exc:
                print(fd, len(data), exc.errno)
        for mode in (0o700, 0o711, 0o755, 0o750):
            try:
                os.mkdir(oct(mode), mode)
                print(oct(mode), "ok")
            except OSError as exc:
                print(oct(mode), exc.errno)
    """
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        # Two different arguments: both must match (fd 9 and 5 bytes).
        {"names": ["write"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EDOM,
         "args": [{"index": 0, "value": 9, "op": "SCMP_CMP_EQ"}, {"index": 2, "value": 5, "op": "SCMP_CMP_EQ"}]},
        # The same argument twice: either may match.
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES,
         "args": [{"index": 1, "value": 0o700, "op": "SCMP_CMP_EQ"},
                  {"index": 1, "value": 0o711, "op": "SCMP_CMP_EQ"}]},
        {"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES,
         "args": [{"index": 2, "value": 0o700, "op": "SCMP_CMP_EQ"},
                  {"index": 2, "value": 0o711, "op": "SCMP_CMP_EQ"}]},
        # Masked: group bits 0o050 (r-x) set -> denied.
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV,
         "args": [{"index": 1, "value": 0o070, "valueTwo": 0o050, "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV,
         "args": [{"index": 2, "value": 0o070, "valueTwo": 0o050, "op": "SCMP_CMP_MASKED_EQ"}]},
    ]}
    status, out = python(script, profile, cwd=str(tmp_path))
    assert status == 0, out
    assert out.splitlines() == [f"9 5 {errno.EDOM}", "9 4 ok", "10 5 ok",
                                f"0o700 {errno.EACCES}", f"0o711 {errno.EACCES}", f"0o755 {errno.EXDEV}",
                                f"0o750 {errno.EXDEV}"]


def test_gt_and_ne_operators(tmp_path):
    script = """
        import os
        for fd in (1, 2, 50):
            try:
                os.fstat(fd) if fd != 50 else os.dup2(1, 50)
                print(fd, "ok")
            except OSError as exc:
                print(fd, exc.errno)
    """
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["dup2", "dup3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EBADF,
         "args": [{"index": 1, "value": 20, "op": "SCMP_CMP_GT"}]},
        {"names": ["fstat", "newfstatat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOTSUP,
         "args": [{"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]}]}
    status, out = python(script, profile, cwd=str(tmp_path))
    assert status == 0, out
    assert out.splitlines() == ["1 ok", f"2 {errno.ENOTSUP}", f"50 {errno.EBADF}"]


@pytest.mark.parametrize("action", ["SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL", "SCMP_ACT_TRAP"])
def test_killing_actions(tmp_path, action):
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir", "mkdirat"], "action": action}]}
    status, out = python("import os; print('before', flush=True); os.mkdir('x'); print('after')", profile,
                         cwd=str(tmp_path))
    assert status == -signal.SIGSYS, out
    assert out == "before\n" and not (tmp_path / "x").exists()


def test_log_and_allow_let_it_through(tmp_path):
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_LOG"},
                            {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}]}
    status, out = python("import os; os.mkdir('x'); print(os.getpid() > 0)", profile, cwd=str(tmp_path))
    assert (status, out) == (0, "True\n")
    assert (tmp_path / "x").is_dir()


def test_unknown_syscall_names_are_skipped(tmp_path):
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["no_such_syscall", "mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}
    status, out = python("import os\ntry: os.mkdir('x')\nexcept OSError as e: print(e.errno)", profile,
                         cwd=str(tmp_path))
    assert (status, out) == (0, f"{errno.EPERM}\n")


def test_an_allow_list(tmp_path):
    # Default ERRNO and what busybox echo needs allowed: the shape of real profiles.
    needed = ["execve", "brk", "arch_prctl", "set_tid_address", "set_robust_list", "rseq", "prlimit64", "mprotect",
              "getuid", "geteuid", "getgid", "getegid", "getpid", "getppid", "write", "writev", "exit_group", "exit",
              "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "uname", "readlink", "readlinkat", "newfstatat",
              "fstat", "ioctl", "getcwd", "mmap", "munmap", "fcntl", "close", "read", "access", "stat", "lstat"]
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": errno.ENOSYS,
               "syscalls": [{"names": needed, "action": "SCMP_ACT_ALLOW"}]}
    status, out = run([BUSYBOX, "echo", "allowed"], {"no_new_privileges": True}, seccomp.build(profile))
    assert (status, out) == (0, "allowed\n")


def test_rule_with_the_default_action_is_skipped():
    # libseccomp refuses such a rule; runc drops it, and so does build().
    compiled = seccomp.build({"defaultAction": "SCMP_ACT_ALLOW",
                              "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}]})
    bare = seccomp.build({"defaultAction": "SCMP_ACT_ALLOW"})
    assert compiled.program == bare.program


def test_flags_reach_the_kernel_call():
    assert seccomp.build({"defaultAction": "SCMP_ACT_ALLOW"}).flags == 0
    assert seccomp.build({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_TSYNC",
                                                                       "SECCOMP_FILTER_FLAG_LOG"]}).flags == 1 | 2


@pytest.mark.parametrize("profile,message", [
    ({"defaultAction": "SCMP_ACT_FOO"}, "unknown action 'SCMP_ACT_FOO'"),
    ({"syscalls": []}, "defaultAction is required"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_EXPLODE"}]},
     r"syscalls\[0\].action: unknown action"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "listener"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]},
     "listener"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]}, "unknown architecture 'SCMP_ARCH_VAX'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NOPE"]}, "unknown flag"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ABOUT"}]}]},
     "unknown operator 'SCMP_CMP_ABOUT'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 0, "op": "SCMP_CMP_EQ"}] * 7}]},
     "too many conditions"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 6, "op": "SCMP_CMP_EQ"}]}]},
     "index must be 0..5"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 0, "value": 2**64, "op": "SCMP_CMP_EQ"}]}]},
     "unsigned 64-bit"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_KILL",
                                                       "errnoRet": 1}]}, "errnoRet is only for"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}, "errnoRet must be"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": "mkdir", "action": "SCMP_ACT_ERRNO"}]},
     "names: expected a list"),
])
def test_build_refuses_clearly(profile, message):
    with pytest.raises(ValueError, match=message):
        seccomp.build(profile)


def test_other_architectures_are_added():
    native = seccomp.build(DENY_MKDIR)
    alone = seccomp.build(dict(DENY_MKDIR, architectures=[]))
    # The x86 (32-bit) rules make the program longer; unknown names for it are fine.
    assert native.instructions > alone.instructions
    with pytest.raises(ValueError, match="not supported by this libseccomp|unknown architecture"):
        seccomp.build({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_M68K"]})
