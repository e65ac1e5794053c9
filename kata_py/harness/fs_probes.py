"""Host files through the shared filesystem: `..` out of the rootfs,
symlinks the host planted in it, hard links.

Each probe has a canary of its own beside the rootfs (its parent directory,
the same filesystem): the container tries to read its secret and to append
to it through every path the probe gives; the host then checks whether the
secret showed up in the container's output, whether the file changed, and
whether it gained a link. The container appends only to paths that exist in
its view, so a probe never litters the rootfs.
"""

from __future__ import annotations

from .probe import Output, Probe, Verdict, broke, held, one_line

READ_WRITE = r"""
IFS='
'
for p in $H_PATHS; do
  if out=$(cat "$p" 2>&1); then echo "read=$p: $out"; else echo "denied=$p: $out"; fi
done
for p in $H_PATHS; do
  if [ -f "$p" ]; then
    if echo "written by the container" 2>/dev/null >> "$p"; then echo "wrote=$p"; else echo "write-denied=$p"; fi
  fi
done
"""


def reason(line: str) -> str:
    """The error at the end of a `denied=PATH: tool: ...: REASON` line."""
    return line.rsplit(": ", 1)[-1] if ": " in line else line


def _paths(paths: list[str]) -> dict[str, str]:
    return {"H_PATHS": "\n".join(paths)}


def canary_verdict(probe: str, output: Output, host, extra: str = "") -> Verdict:
    canary = host.fixtures[probe]
    breaches = canary.breaches(output.text)
    if breaches:
        return broke(f"the container {', '.join(breaches)} (host file {canary.path})")
    denied = output.values("denied")
    tried = len(denied) + len(output.values("read"))
    why = f": {reason(denied[0])}" if denied else ""
    return held(one_line(f"{extra}{tried} path(s) tried{why}; host canary unread, unchanged, unlinked"))


# -- `..` out of the rootfs


def setup_dotdot(host) -> dict[str, str]:
    canary = host.fixtures["fs-dotdot"] = host.canary("dotdot")
    beside = str(canary.path.relative_to(host.rootfs.parent))
    paths = ["/" + "../" * k + beside for k in (1, 2, 3)]
    paths += [str(canary.path), "/" + "../" * 8 + str(canary.path).lstrip("/"),
              f"{host.plant}/{host.relative_climb(canary.path, 0)}",
              f"{host.plant}/{host.relative_climb(canary.path, 3)}"]
    return _paths(paths)


DOTDOT = Probe(
    name="fs-dotdot",
    title="read/write a host file beside the rootfs through `..` (and its absolute host path)",
    setup=setup_dotdot,
    script=READ_WRITE,
    evidence=("read|denied",),
    check=lambda output, host: canary_verdict("fs-dotdot", output, host))


# -- a symlink to / planted by the host


def setup_symlink_root(host) -> dict[str, str]:
    canary = host.fixtures["fs-symlink-root"] = host.canary("symlink-root")
    link = host.plant_symlink("root-link", "/")
    return {**_paths([f"{link}{canary.path}", f"{link}/../{canary.path.relative_to(host.rootfs.parent)}"]),
            "H_LINK": link}


SYMLINK_ROOT = Probe(
    name="fs-symlink-root",
    title="read/write a host file through a symlink to / that the host planted in the rootfs",
    setup=setup_symlink_root,
    script='echo "link-lists=$(ls "$H_LINK/" 2>&1 | tr \'\\n\' \' \')"\n' + READ_WRITE,
    evidence=("link-lists", "read|denied"),
    check=lambda output, host: canary_verdict(
        "fs-symlink-root", output, host,
        extra=f"the link to / is the container's root ({one_line(output.value('link-lists'), 32)}); "))


# -- symlinks to the host file itself


def setup_symlink_file(host) -> dict[str, str]:
    canary = host.fixtures["fs-symlink-file"] = host.canary("symlink-file")
    absolute = host.plant_symlink("canary-link", str(canary.path))
    relative = host.plant_symlink("canary-climb", host.relative_climb(canary.path, 2))
    return _paths([absolute, relative])


SYMLINK_FILE = Probe(
    name="fs-symlink-file",
    title="read/write a host file through symlinks to it planted in the rootfs (absolute, and ../ climbing)",
    setup=setup_symlink_file,
    script=READ_WRITE,
    evidence=("read|denied",),
    check=lambda output, host: canary_verdict("fs-symlink-file", output, host))


# -- hard links


def setup_hardlink_made(host) -> dict[str, str]:
    canary = host.fixtures["fs-hardlink-made"] = host.canary("hardlink-made")
    beside = str(canary.path.relative_to(host.rootfs.parent))
    root_link = host.plant_symlink("hardlink-root-link", "/")
    file_link = host.plant_symlink("hardlink-canary-link", str(canary.path))
    return _paths(["/../" + beside, str(canary.path), f"{root_link}{canary.path}", file_link])


HARDLINK_MADE = Probe(
    name="fs-hardlink-made",
    title="hard-link a host file into the rootfs from inside (through `..`, its host path, planted symlinks)",
    setup=setup_hardlink_made,
    # Links go into the harness's directory in the rootfs (the shared
    # filesystem itself, where a link to a host file could exist at all)
    # and beside the file, wherever the path reached it.
    script=r"""
IFS='
'
i=0
for p in $H_PATHS; do
  i=$((i + 1))
  for l in "$H_PLANT/scratch/link-$$-$i" "${p%/*}/.kata-py-harness-link-$$-$i"; do
    if out=$(ln "$p" "$l" 2>&1); then
      echo "linked=$p"; echo "read=$p: $(cat "$l" 2>&1)"
      echo "written by the container" 2>/dev/null >> "$l"
    else echo "denied=$p: $out"; fi
  done
done
""",
    evidence=("linked|denied",),
    check=lambda output, host: canary_verdict("fs-hardlink-made", output, host))


def setup_hardlink_host(host) -> dict[str, str]:
    canary = host.fixtures["fs-hardlink-host"] = host.canary("hardlink-host")
    return _paths([host.plant_hardlink("hardlink", canary)])


HARDLINK_HOST = Probe(
    name="fs-hardlink-host",
    title="read/write a host file through a hard link the host itself made in the rootfs (opt-in: see README)",
    setup=setup_hardlink_host,
    script=READ_WRITE,
    evidence=("read|denied",),
    control="shared-kernel",
    check=lambda output, host: canary_verdict("fs-hardlink-host", output, host),
    # A hard link is the file itself, not a path to it: whatever serves the
    # rootfs (a bind mount, 9p, virtio-fs) serves that inode. The host that
    # made the link gave the file away; no runtime can hold this one.
    default=False)

PROBES = [DOTDOT, SYMLINK_ROOT, SYMLINK_FILE, HARDLINK_MADE, HARDLINK_HOST]
