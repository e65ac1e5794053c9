"""`kata-py check`: what this host gives the runtime, and what the runtime chose."""

from __future__ import annotations

import json
import os


def add_parser(sub) -> None:
    check = sub.add_parser("check", help="report the host: accelerator, vsock, shared fs, cgroups, image")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=cmd_check)


def host_report() -> dict:
    from .. import paths
    from ..image import find_image
    from ..vmm import host
    from ..vmm.probe import choose_accel

    image = find_image()
    report: dict = {
        "qemu": host.qemu_version(),
        "kvm_device": os.path.exists("/dev/kvm"),
        "kvm_modules": host.kvm_module_facts(),
        "tsc_khz": host.tsc_khz(),
        "cgroups": host.cgroup_version(),
        "state_dir": str(paths.state_dir()),
        "run_dir": str(paths.run_dir()),
    }
    if os.path.exists("/dev/vhost-vsock"):
        report["vsock"] = "vhost-vsock (kernel): /dev/vhost-vsock present, host connects with AF_VSOCK"
    else:
        report["vsock"] = ("vhost-user-vsock served by kata-py's own backend (hybrid vsock over a Unix socket): "
                           "no /dev/vhost-vsock on this host")
    from ..config import shared_fs
    from ..vmm import virtiofsd

    if shared_fs() == "virtio-fs":
        report["shared_fs"] = (f"virtio-fs, one virtiofsd per VM ({virtiofsd.BINARY})" if virtiofsd.installed()
                               else "virtio-fs selected, but no virtiofsd on this host: select 9p "
                                    "(KATA_PY_SHARED_FS=9p)")
    else:
        report["shared_fs"] = "virtio-9p (built into QEMU), selected by KATA_PY_SHARED_FS or [vm] shared_fs"
    from ..vmm import jail
    report["qemu_jail"] = ("on: own namespaces, an unprivileged uid, no capabilities, a root of its own "
                           "(QEMU, and the vsock back end under a seccomp filter)"
                           if jail.enabled() else "off (KATA_PY_JAIL=off): QEMU and the vsock back end run as root "
                                                  "in the host's namespaces")
    if image is None:
        report["image"] = None
        report["accel"] = {"accel": None, "reason": "no guest image yet to probe with: run `kata-py image build`"}
    else:
        report["image"] = {"directory": str(image.directory), "kernel": str(image.kernel),
                           "initrd": str(image.initrd), "kernel_release": image.kernel_release,
                           "kernel_variant": image.manifest.get("kernel_variant", "debian"),
                           "rootfs": str(image.rootfs) if image.rootfs else None}
        choice = choose_accel(image.kernel, image.floor_initrd, paths.state_dir())
        report["accel"] = {"accel": choice.accel, "reason": choice.reason, "cached": choice.cached}
    return report


def cmd_check(args) -> int:
    report = host_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    accel = report["accel"]
    lines = [
        ("accelerator", f"{(accel['accel'] or 'unknown').upper()}: {accel['reason']}"),
        ("qemu", report["qemu"]),
        ("/dev/kvm", "present" + (f" (modules: {', '.join(report['kvm_modules'])})" if report["kvm_modules"] else "")
         if report["kvm_device"] else "absent"),
        ("vsock", report["vsock"]),
        ("shared fs", report["shared_fs"]),
        ("qemu jail", report["qemu_jail"]),
        ("cgroups (host)", report["cgroups"]),
        ("guest image", report["image"]["directory"] if report["image"] else "not built"),
    ]
    if report["image"]:
        lines += [("  kernel", f"{report['image']['kernel']} ({report['image']['kernel_release']}, "
                               f"{report['image']['kernel_variant']})")]
        lines += ([("  root disk", report["image"]["rootfs"])] if report["image"]["rootfs"]
                  else [("  initrd", report["image"]["initrd"])])
    lines += [("state dir", report["state_dir"]), ("run dir", report["run_dir"])]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return 0
