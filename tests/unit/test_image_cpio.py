"""The initramfs writer: newc layout the kernel accepts, deterministic output."""

import io
import stat

from kata_py.image import cpio


def _sample():
    return [
        cpio.Entry.file("usr/bin/tool", b"\x7fELF binary", 0o755),
        cpio.Entry.directory("usr"),
        cpio.Entry.directory("usr/bin"),
        cpio.Entry.symlink("bin/sh", "/bin/busybox"),
        cpio.Entry.directory("bin"),
        cpio.Entry.chardev("dev/console", 5, 1),
        cpio.Entry.directory("dev"),
        cpio.Entry.file("init", b"#!/bin/sh\n", 0o755),
        cpio.Entry.file("etc/odd", b"abc"),  # length not a multiple of 4
        cpio.Entry.directory("etc"),
    ]


def _write(entries):
    buf = io.BytesIO()
    n = cpio.write(entries, buf)
    assert n == len(buf.getvalue())
    return buf.getvalue()


def test_round_trip():
    data = _write(_sample())
    assert len(data) % 512 == 0
    back = {e.path: e for e in cpio.read(data)}
    want = {e.path: e for e in _sample()}
    assert back.keys() == want.keys()
    for path, e in want.items():
        assert back[path].mode == e.mode, path
        assert back[path].data == e.data, path
        assert back[path].rdev == e.rdev, path
    assert back["dev/console"].rdev == (5, 1)
    assert stat.S_ISCHR(back["dev/console"].mode)
    assert back["bin/sh"].data == b"/bin/busybox"


def test_sorted_parents_first_and_deterministic():
    entries = cpio.read(_write(_sample()))
    paths = [e.path for e in entries]
    assert paths == sorted(paths)
    for i, p in enumerate(paths):
        if "/" in p:
            assert paths.index(p.rsplit("/", 1)[0]) < i
    assert _write(_sample()) == _write(list(reversed(_sample())))


def test_headers_are_root_owned_with_zero_mtime():
    data = _write([cpio.Entry.file("a", b"x")])
    assert data[:6] == b"070701"
    fields = [int(data[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    uid, gid, mtime = fields[2], fields[3], fields[5]
    assert (uid, gid, mtime) == (0, 0, 0)


def test_duplicate_path_rejected():
    import pytest
    with pytest.raises(ValueError):
        _write([cpio.Entry.file("a", b""), cpio.Entry.file("/a", b"")])
