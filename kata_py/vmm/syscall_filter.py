"""A seccomp filter for a jailed helper that only serves fds it holds (the
vsock back end): the system calls that would reach new kernel surface or
leave the jail fail with EPERM; the rest, what Python and a select loop use,
is allowed.

Denied: making or entering namespaces (clone with a namespace flag, clone3
(ENOSYS, so that threads fall back to clone), unshare, setns: a user namespace would give the process capabilities over
new mounts and network stacks), running anything (execve, execveat), mounts
and roots, tracing and reading other processes, modules, kexec, BPF,
perf events, userfaultfd, keyrings, handles by inode, swap, reboot,
accounting; and any system call of another ABI (x32 numbers, or a process
that is not x86_64), which would pass a list of x86_64 numbers unchecked.

Installed after no_new_privs, so no privilege is needed.
"""

from __future__ import annotations

import ctypes
import os
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl)
DENIED = {
    "ptrace": 101, "chroot": 161, "acct": 163, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "init_module": 175, "delete_module": 176, "pivot_root": 155, "unshare": 272,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "execveat": 322, "userfaultfd": 323,
    "perf_event_open": 298, "execve": 59, "fsopen": 430, "fsmount": 432, "move_mount": 429,
    "open_tree": 428, "mount_setattr": 442,
}
SYS_CLONE = 56
# clone3 passes its flags in memory, where a filter cannot look: it fails with
# ENOSYS, so that the C library falls back to clone, whose flags it can.
SYS_CLONE3 = 435
ENOSYS = 38
# clone(2)'s flags that make namespaces (CLONE_NEWNS ... CLONE_NEWNET, CLONE_NEWCGROUP, CLONE_NEWTIME)
NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80

# seccomp(2) and classic BPF
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_KILL_PROCESS = 0x80000000
EPERM = 1
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
OFFSET_NR, OFFSET_ARCH, OFFSET_ARG0_LOW = 0, 4, 16
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program() -> bytes:
    """The filter, as classic BPF instructions."""
    deny = SECCOMP_RET_ERRNO | EPERM
    out = [
        _insn(BPF_LD_W_ABS, 0, 0, OFFSET_ARCH),
        _insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        _insn(BPF_LD_W_ABS, 0, 0, OFFSET_NR),
        _insn(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        _insn(BPF_RET_K, 0, 0, deny),
    ]
    for number in sorted(DENIED.values()):
        out += [_insn(BPF_JEQ_K, 0, 1, number), _insn(BPF_RET_K, 0, 0, deny)]
    out += [_insn(BPF_JEQ_K, 0, 1, SYS_CLONE3), _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS)]
    # clone: threads yes, namespaces no (the flags are the low word of the first argument)
    out += [_insn(BPF_JEQ_K, 0, 3, SYS_CLONE),
            _insn(BPF_LD_W_ABS, 0, 0, OFFSET_ARG0_LOW),
            _insn(BPF_JSET_K, 0, 1, NAMESPACE_FLAGS),
            _insn(BPF_RET_K, 0, 0, deny),
            _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)]
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Load the filter into this process (no_new_privs must be set). OSError if refused."""
    code = program()
    buffer = ctypes.create_string_buffer(code)
    prog = _SockFprog(len(code) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")
