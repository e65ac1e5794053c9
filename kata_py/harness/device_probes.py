"""Host devices: /dev/kvm, /dev/mem, the host's disks (listed, read,
mounted). Device nodes mean whatever the kernel behind them says, so where
the container opens one, the verdict also asks whose kernel that is (its
boot_id against the host's); where the host can check the content itself
(a disk's first bytes, a canary on the root filesystem), it does."""

from __future__ import annotations

from pathlib import Path

from .fs_probes import reason
from .host_state import DISK_HEAD_BYTES, block_location
from .probe import (BOOT_ID, Output, Probe, SkipProbe, Verdict, broke, held, inconclusive, one_line,
                    same_kernel)

OPEN_CHAR_DEVICE = BOOT_ID + r"""
nodes=""
if [ -c "$H_NODE" ]; then nodes="$H_NODE"; echo "present=$H_NODE"; else echo "absent=$H_NODE"; fi
if mknod "$S/dev" c $H_MAJOR $H_MINOR 2>"$S/err"; then nodes="$nodes $S/dev"; else echo "mknod-denied=$(cat "$S/err")"; fi
for n in $nodes; do
  if (exec 3<>"$n") 2>"$S/err"; then echo "opened=$n"
    echo "bytes=$n: $(dd if="$n" bs=4096 count=1 2>/dev/null | wc -c)"
  else echo "open-denied=$n: $(cat "$S/err")"; fi
done
"""


def _setup_char_device(node: str, major: int, minor: int) -> dict[str, str]:
    if not Path(f"/sys/dev/char/{major}:{minor}").exists():
        # Nothing a container could reach: no control could make this probe break, so no held is earned.
        raise SkipProbe(f"the host kernel has no {node} ({major}:{minor}): nothing to reach")
    return {"H_NODE": node, "H_MAJOR": str(major), "H_MINOR": str(minor)}


def _char_device(name: str, node: str, major: int, minor: int, what: str):
    def check(output: Output, host) -> Verdict:
        opened = output.values("opened")
        if not opened:
            found = [] if output.values("present") else [f"{node} absent"]
            found += [f"mknod: {reason(line)}" for line in output.values("mknod-denied")]
            found += [f"open {line.split(': ', 1)[0]}: {reason(line)}" for line in output.values("open-denied")]
            return held(one_line("; ".join(found) or "no report"))
        kernel = same_kernel(output, host.facts)
        if kernel is False:
            return held(one_line(f"opened {', '.join(opened)}, but of a kernel of its own (boot_id differs from "
                                 f"the host's): not the host's {what}"))
        because = "on the host's own kernel (same boot_id)" if kernel else "and could not show whose kernel it is"
        return broke(one_line(f"opened {', '.join(opened)} ({major}:{minor}, {what}) {because}"))

    return Probe(name=name, title=f"open {node} ({what}), or make the node with mknod",
                 setup=lambda host: _setup_char_device(node, major, minor),
                 script=OPEN_CHAR_DEVICE, check=check,
                 evidence=("present|absent", "boot_id", "opened|open-denied|mknod-denied"))


KVM = _char_device("dev-kvm", "/dev/kvm", 10, 232, "the KVM hypervisor")
MEM = _char_device("dev-mem", "/dev/mem", 1, 1, "physical memory")


# -- the host's disks, listed


def _check_disks_visible(output: Output, host) -> Verdict:
    seen = set()
    for line in output.values("disk") + output.values("partition"):
        name, _, sectors = line.rpartition(":")
        if sectors.isdigit():
            seen.add((name, int(sectors)))
    shared = [d for d in host.disks() if (d.name, d.sectors) in seen]
    if shared:
        return broke(one_line(f"lists the host's {', '.join(d.describe() for d in shared)} "
                              f"(same names and sizes as the host's /sys/block)"))
    own = ", ".join(sorted(f"{name}" for name, sectors in seen if sectors)) or "no disk with a size"
    hosts = ", ".join(d.describe() for d in host.disks()) or "none"
    return held(one_line(f"lists {own}; the host has {hosts}"))


DISKS_VISIBLE = Probe(
    name="host-disks-visible",
    title="list the host's block devices in /sys/block and /proc/partitions",
    script=r"""
n=0
for b in /sys/block/*; do [ -r "$b/size" ] && { echo "disk=${b##*/}:$(cat "$b/size")"; n=$((n + 1)); }; done
echo "sys_block=$n"
n=0
while read major minor blocks name; do
  case "$major" in [0-9]*) echo "partition=$name:$((blocks * 2))"; n=$((n + 1));; esac
done < /proc/partitions && echo "partitions=$n"
""",
    evidence=("sys_block", "partitions"),
    control="shared-kernel",
    check=_check_disks_visible)


# -- the host's disks, read


def _setup_disk_read(host) -> dict[str, str]:
    if not host.disks():
        raise SkipProbe("the host has no block device with a size")
    if not any(d.head_sha256 for d in host.disks()):
        raise SkipProbe("the host cannot read its own disks' first bytes: nothing to compare a read with")
    return {"H_DISKS": " ".join(f"{d.name}:{d.major}:{d.minor}" for d in host.disks()),
            "H_BYTES": str(DISK_HEAD_BYTES)}


def _check_disk_read(output: Output, host) -> Verdict:
    hashes = {d.head_sha256: d for d in host.disks() if d.head_sha256}
    reads = output.values("read")
    for line in reads:
        node, _, digest = line.rpartition(":")
        if digest in hashes:
            return broke(one_line(f"read the host's {hashes[digest].describe()} through {node}: its first "
                                  f"{DISK_HEAD_BYTES >> 10} KiB match the host's"))
    if reads and not hashes:
        return inconclusive("the container read block devices, but the host could not read its own to compare")
    if reads:
        return held(one_line(f"read {', '.join(r.rpartition(':')[0] for r in reads)}: none matches the first "
                             f"{DISK_HEAD_BYTES >> 10} KiB of a host disk"))
    found = [f"read {line.split(': ', 1)[0]}: {reason(line)}" for line in output.values("read-denied")]
    if not found:
        found = ["no block device node"] + [f"mknod: {reason(line)}" for line in output.values("mknod-denied")[:1]]
    return held(one_line("; ".join(found)))


DISK_READ = Probe(
    name="host-disk-read",
    title="read the host's disks (nodes in /dev, or made with mknod for the host's major:minor)",
    setup=_setup_disk_read,
    script=r"""
for spec in $H_DISKS; do
  name=${spec%%:*}; mm=${spec#*:}
  mknod "$S/blk-$name" b ${mm%%:*} ${mm#*:} 2>"$S/err" || echo "mknod-denied=$name: $(cat "$S/err")"
done
seen=" "
for n in $(find /dev -type b 2>/dev/null) "$S"/blk-*; do
  [ -b "$n" ] || continue
  case "$seen" in *" $n "*) continue;; esac
  seen="$seen$n "
  if head -c "$H_BYTES" "$n" >/dev/null 2>"$S/err"; then
    echo "read=$n:$(head -c "$H_BYTES" "$n" | sha256sum | cut -d' ' -f1)"
  else echo "read-denied=$n: $(cat "$S/err")"; fi
done
echo "nodes=$(echo $seen | wc -w)"
""",
    evidence=("nodes",),
    check=_check_disk_read)


# -- the host's disk, mounted


def _setup_disk_mount(host) -> dict[str, str]:
    canary = host.canary("disk-mount")
    location = block_location(canary.path)
    if location is None:
        raise SkipProbe(f"{canary.path.parent} is not on a block device: no host disk holds the canary")
    dev, inside = location
    name = Path(f"/sys/dev/block/{dev}").resolve().name
    try:
        with open(f"/dev/{name}", "rb") as disk:
            disk.read(512)
    except OSError as exc:
        raise SkipProbe(f"the host itself cannot read its disk /dev/{name} ({dev}): {exc.strerror}") from None
    host.fixtures["host-disk-mount"] = (canary, dev)
    return {"H_DEV": dev, "H_DEVNAME": name, "H_INSIDE": inside}


def _check_disk_mount(output: Output, host) -> Verdict:
    canary, dev = host.fixtures["host-disk-mount"]
    breaches = canary.breaches(output.text)
    if breaches:
        return broke(one_line(f"mounted the host's disk {dev} and {', '.join(breaches)}"))
    mounted = output.values("mounted")
    denied = output.values("mount-denied") or output.values("mknod-denied")
    if mounted:
        return held(one_line(f"mounted {', '.join(mounted)}, but not the host's {dev}: the canary on it was "
                             f"not there"))
    return held(one_line(f"could not mount the host's disk {dev}" + (f": {reason(denied[0])}" if denied else "")))


DISK_MOUNT = Probe(
    name="host-disk-mount",
    title="mount the host's disk holding the rootfs (read-only) and read a canary on it",
    setup=_setup_disk_mount,
    script=r"""
mkdir -p "$S/mnt"
nodes=""
[ -b "/dev/$H_DEVNAME" ] && nodes="/dev/$H_DEVNAME"
if mknod "$S/disk" b ${H_DEV%%:*} ${H_DEV#*:} 2>"$S/err"; then nodes="$nodes $S/disk"
else echo "mknod-denied=$(cat "$S/err")"; fi
for n in $nodes; do
  if mount -o ro "$n" "$S/mnt" 2>"$S/err"; then
    echo "mounted=$n"; echo "read=$n: $(cat "$S/mnt/$H_INSIDE" 2>&1)"; umount "$S/mnt"
  else echo "mount-denied=$n: $(cat "$S/err")"; fi
done
""",
    evidence=("mounted|mount-denied|mknod-denied",),
    check=_check_disk_mount)

PROBES = [KVM, MEM, DISKS_VISIBLE, DISK_READ, DISK_MOUNT]
