"""The image's content hash follows its inputs, and nothing else."""

from pathlib import Path

from kata_py.image import builder


def _inputs(root: Path) -> builder.Inputs:
    files = {
        "agent/init": "#!/usr/bin/python3.11 -SB\nimport kata_agent.main\n",
        "agent/kata_agent/__init__.py": "",
        "agent/kata_agent/main.py": "def main():\n    pass\n",
        "protocol/__init__.py": "AGENT_PORT = 1024\n",
        "guest/modules.txt": "vsock\n",
        "image/code.py": "X = 1\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return builder.Inputs(root / "agent", root / "protocol", root / "guest", root / "image")


def test_hash_is_stable(tmp_path):
    inputs = _inputs(tmp_path)
    assert builder.local_hash(inputs) == builder.local_hash(inputs)


def test_hash_changes_with_any_input_file(tmp_path):
    inputs = _inputs(tmp_path)
    before = builder.local_hash(inputs)
    for rel in ("agent/kata_agent/main.py", "protocol/__init__.py", "guest/modules.txt",
                "image/code.py", "agent/init"):
        f = tmp_path / rel
        old = f.read_text()
        f.write_text(old + "# changed\n")
        assert builder.local_hash(inputs) != before, rel
        f.write_text(old)
        assert builder.local_hash(inputs) == before, rel


def test_new_file_and_mode_change_count(tmp_path):
    inputs = _inputs(tmp_path)
    before = builder.local_hash(inputs)
    new = tmp_path / "agent/kata_agent/extra.py"
    new.write_text("")
    assert builder.local_hash(inputs) != before
    new.unlink()
    (tmp_path / "agent/init").chmod(0o755)
    assert builder.local_hash(inputs) != before


def test_bytecode_caches_and_timestamps_do_not_count(tmp_path):
    import os
    inputs = _inputs(tmp_path)
    before = builder.local_hash(inputs)
    cache = tmp_path / "agent/kata_agent/__pycache__"
    cache.mkdir()
    (cache / "main.cpython-311.pyc").write_bytes(b"junk")
    (tmp_path / "protocol/stale.pyc").write_bytes(b"junk")
    os.utime(tmp_path / "agent/kata_agent/main.py", (1, 1))
    assert builder.local_hash(inputs) == before


def test_package_versions_change_the_image_hash():
    local = "0" * 64
    a = builder.image_hash(local, {"libc6": "2.36-9+deb12u13", "python3.11-minimal": "3.11.2-6"})
    b = builder.image_hash(local, {"libc6": "2.36-9+deb12u14", "python3.11-minimal": "3.11.2-6"})
    assert a != b
    assert a == builder.image_hash(local, {"python3.11-minimal": "3.11.2-6", "libc6": "2.36-9+deb12u13"})


def test_shebang_optimisation_level(tmp_path):
    f = tmp_path / "init"
    for line, level in [("#!/usr/bin/python3.11 -SB", 0), ("#!/usr/bin/python3.11 -O", 1),
                        ("#!/usr/bin/python3.11 -SOO", 2), ("#!/bin/sh", 0)]:
        f.write_text(line + "\n")
        assert builder._shebang_optimize(f) == level, line
