"""OCI `linux.seccomp` -> a seccomp BPF program, compiled with libseccomp
(through ctypes) in the agent, loaded in the container's child process.

`build()` runs in the agent, before any fork: every mistake in the profile is
a ValueError there, and libseccomp's output is exported as the raw BPF
program. The child's `Filter.load()` is then a single seccomp(2) call: no
library code, no allocation, nothing to import after the container's chroot.

Follows runc where the runtime spec leaves room: syscall names this
libseccomp does not know are skipped; a rule whose action is the default
action is skipped (libseccomp refuses it); SCMP_ACT_ERRNO and SCMP_ACT_TRACE
without errnoRet return EPERM; conditions on distinct arguments form one rule
(all must match), conditions that repeat an argument index become one rule
each (any may match). libseccomp's own NO_NEW_PRIVS switch is off: whether the
process gets no_new_privs is the process spec's decision (see credentials).
"""

from __future__ import annotations

import ctypes
import os

from kata_py.protocol.oci_names import SECCOMP_ACTIONS, SECCOMP_ARCHITECTURES, SECCOMP_OPERATORS

from .spawn import StepFailed

EPERM = 1
SYS_SECCOMP = 317  # x86_64
SECCOMP_SET_MODE_FILTER = 1
BPF_MAXINSNS = 4096  # the kernel refuses longer programs
MAX_ARGS = 6

ACTIONS_WITH_DATA = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")
# OCI flag -> (libseccomp attribute that checks this kernel supports it, seccomp(2) flag)
SCMP_FLTATR_CTL_NNP = 3
FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": (4, 1),       # SCMP_FLTATR_CTL_TSYNC
    "SECCOMP_FILTER_FLAG_LOG": (6, 2),         # SCMP_FLTATR_CTL_LOG
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": (7, 4),  # SCMP_FLTATR_CTL_SSB
}
NR_SCMP_ERROR = -1
EEXIST = 17


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp"""
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    """struct sock_fprog"""
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_lib = None


def _libseccomp():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.restype = None
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(_ArgCmp)]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        for fn in (lib.seccomp_attr_set, lib.seccomp_arch_add, lib.seccomp_syscall_resolve_name,
                   lib.seccomp_rule_add_array, lib.seccomp_export_bpf):
            fn.restype = ctypes.c_int
        _lib = lib
    return _lib


_syscall = None


def _libc_syscall():
    global _syscall
    if _syscall is None:
        _syscall = ctypes.CDLL(None, use_errno=True).syscall
        _syscall.restype = ctypes.c_long
    return _syscall


class Filter:
    """A compiled filter; `load()` installs it on the calling thread (the child)."""

    def __init__(self, program: bytes, flags: int) -> None:
        self.program = program
        self.flags = flags
        self.instructions = len(program) // 8  # struct sock_filter is 8 bytes
        # Kept alive with the Filter: the child reads them after fork.
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(self.instructions, ctypes.addressof(self._buffer))
        self._fprog_ref = ctypes.byref(self._fprog)
        self._syscall = _libc_syscall()
        self._get_errno = ctypes.get_errno

    def load(self) -> None:
        ret = self._syscall(ctypes.c_long(SYS_SECCOMP), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                            ctypes.c_long(self.flags), self._fprog_ref)
        if ret != 0:
            raise StepFailed("seccomp", self._get_errno())


def _action(name, errno_ret, where: str) -> int:
    if name == "SCMP_ACT_NOTIFY":
        raise ValueError(f"{where}: SCMP_ACT_NOTIFY needs a seccomp listener, which kata-py does not provide")
    if not isinstance(name, str) or name not in SECCOMP_ACTIONS:
        raise ValueError(f"{where}: unknown action {name!r} (known: {', '.join(sorted(SECCOMP_ACTIONS))})")
    if name in ACTIONS_WITH_DATA:
        data = EPERM if errno_ret is None else errno_ret
        if not isinstance(data, int) or isinstance(data, bool) or not 0 <= data <= 0xFFFF:
            raise ValueError(f"{where}: errnoRet must be an integer in 0..65535, got {errno_ret!r}")
        return SECCOMP_ACTIONS[name] | data
    if errno_ret is not None:
        raise ValueError(f"{where}: errnoRet is only for SCMP_ACT_ERRNO and SCMP_ACT_TRACE, not {name}")
    return SECCOMP_ACTIONS[name]


def _conditions(args, where: str) -> list[list[_ArgCmp]]:
    """The argument conditions as libseccomp rules: one rule when every condition
    names a different argument, else one rule per condition."""
    if args is None:
        return [[]]
    if not isinstance(args, list):
        raise ValueError(f"{where}.args: expected a list")
    if len(args) > MAX_ARGS:
        raise ValueError(f"{where}.args: too many conditions ({len(args)}; a system call has {MAX_ARGS} arguments)")
    conditions = []
    for i, arg in enumerate(args):
        here = f"{where}.args[{i}]"
        if not isinstance(arg, dict):
            raise ValueError(f"{here}: expected an object")
        index = arg.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_ARGS:
            raise ValueError(f"{here}: index must be 0..{MAX_ARGS - 1}, got {index!r}")
        op = arg.get("op")
        if op not in SECCOMP_OPERATORS:
            raise ValueError(f"{here}: unknown operator {op!r} (known: {', '.join(SECCOMP_OPERATORS)})")
        values = []
        for key in ("value", "valueTwo"):
            value = arg.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
                raise ValueError(f"{here}.{key}: expected an unsigned 64-bit integer, got {value!r}")
            values.append(value)
        conditions.append(_ArgCmp(index, SECCOMP_OPERATORS[op], values[0], values[1]))
    if not conditions:
        return [[]]
    if len({c.arg for c in conditions}) == len(conditions):
        return [conditions]
    return [[c] for c in conditions]


def build(profile: dict) -> Filter:
    """Compile an OCI linux.seccomp object. ValueError for anything wrong with it."""
    if not isinstance(profile, dict):
        raise ValueError(f"expected an object, got {type(profile).__name__}")
    if "defaultAction" not in profile:
        raise ValueError("defaultAction is required")
    default = _action(profile["defaultAction"], profile.get("defaultErrnoRet"), "defaultAction")
    lib = _libseccomp()
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise ValueError(f"libseccomp refused the default action {profile['defaultAction']!r}")
    try:
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0), "turning off libseccomp's no_new_privs")
        for arch in _list(profile, "architectures"):
            name = SECCOMP_ARCHITECTURES.get(arch) if isinstance(arch, str) else None
            if name is None:
                raise ValueError(f"architectures: unknown architecture {arch!r}")
            token = lib.seccomp_arch_resolve_name(name.encode())
            if not token:
                raise ValueError(f"architectures: {arch} is not supported by this libseccomp")
            ret = lib.seccomp_arch_add(ctx, token)
            if ret != -EEXIST:  # the native architecture is always there
                _check(ret, f"adding architecture {arch}")
        kernel_flags = 0
        for flag in _list(profile, "flags"):
            if flag not in FLAGS:
                raise ValueError(f"flags: unknown flag {flag!r} (known: {', '.join(FLAGS)})")
            attribute, bit = FLAGS[flag]
            _check(lib.seccomp_attr_set(ctx, attribute, 1), f"flags: {flag} (not supported here?)")
            kernel_flags |= bit
        for index, rule in enumerate(_list(profile, "syscalls")):
            _add_rule(lib, ctx, rule, default, f"syscalls[{index}]")
        program = _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)
    if len(program) // 8 > BPF_MAXINSNS:
        raise ValueError(f"the compiled filter has {len(program) // 8} instructions; the kernel takes {BPF_MAXINSNS}")
    return Filter(program, kernel_flags)


def _list(profile: dict, key: str) -> list:
    value = profile.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{key}: expected a list, got {type(value).__name__}")
    return value


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise ValueError(f"{what}: {os.strerror(-ret)}")


def _add_rule(lib, ctx, rule, default: int, where: str) -> None:
    if not isinstance(rule, dict):
        raise ValueError(f"{where}: expected an object")
    names = rule.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}.names: expected a list of system call names")
    action = _action(rule.get("action"), rule.get("errnoRet"), f"{where}.action")
    rules = _conditions(rule.get("args"), where)
    if action == default:
        return
    for name in names:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number == NR_SCMP_ERROR:
            continue  # a system call this libseccomp does not know: runc skips it too
        for conditions in rules:
            array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
            _check(lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array),
                   f"{where}: rule for {name}")


def _export(lib, ctx) -> bytes:
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        _check(lib.seccomp_export_bpf(ctx, fd), "exporting the filter")
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
