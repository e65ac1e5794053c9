"""kata_py/vmm/syscall_filter.py, loaded for real into a forked child: what
it denies fails with EPERM, what a Python select loop needs still works."""

import ctypes
import os
import threading

from kata_py.vmm import syscall_filter

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38


def in_filtered_child(check) -> int:
    """Run check() in a forked child under the filter; its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 100
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            syscall_filter.install()
            code = check(libc)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def errno_of(libc, result) -> int:
    return ctypes.get_errno() if result == -1 else 0


def test_new_namespaces_execve_mount_and_tracing_are_denied():
    def check(libc):
        denied = [errno_of(libc, libc.unshare(CLONE_NEWUSER)),
                  errno_of(libc, libc.unshare(CLONE_NEWNET)),
                  errno_of(libc, libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
                  errno_of(libc, libc.ptrace(0, 0, None, None)),
                  errno_of(libc, libc.syscall(56, CLONE_NEWUSER, None, None, None, None))]   # clone
        try:
            os.execv("/bin/true", ["true"])
        except PermissionError:
            denied.append(1)
        return 0 if denied == [1] * 6 else 1
    assert in_filtered_child(check) == 0


def test_what_a_select_loop_needs_still_works(tmp_path):
    def check(libc):
        r, w = os.pipe()
        os.write(w, b"x")
        assert os.read(r, 1) == b"x"
        (tmp_path / "f").write_text("ok")
        box = []
        thread = threading.Thread(target=box.append, args=(1,))    # clone3 -> ENOSYS -> clone
        thread.start()
        thread.join()
        pid = os.fork()                                             # clone without namespace flags
        if pid == 0:
            os._exit(7)
        return 0 if box == [1] and os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7 else 1
    assert in_filtered_child(check) == 0


def test_the_filter_is_one_program_of_whole_instructions():
    code = syscall_filter.program()
    assert len(code) % 8 == 0 and 0 < len(code) // 8 <= 4096    # BPF_MAXINSNS
