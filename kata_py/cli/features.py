"""`kata-py features`: what this runtime implements, in runc's features JSON."""

import json

from ..protocol import oci_names


def add_parser(sub) -> None:
    parser = sub.add_parser("features", help="show the enabled features")
    parser.set_defaults(func=cmd_features)


def features() -> dict:
    """What this runtime implements; the guest agent's part from the tables it applies."""
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.0.2",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": sorted(oci_names.FLAG_OPTIONS) + sorted(oci_names.PROPAGATION_OPTIONS),
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": list(oci_names.CAPABILITIES),
            "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True, "actions": sorted(oci_names.SECCOMP_ACTIONS),
                        "operators": sorted(oci_names.SECCOMP_OPERATORS),
                        "archs": sorted(oci_names.SECCOMP_ARCHITECTURES)},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "io.kata-py.sandbox": "every container runs in its own QEMU guest; isolation is the guest kernel",
            "io.kata-py.network": "a network namespace given by path is carried into the VM (a tap beside "
                                  "each veth, tc mirred both ways, virtio-net); the host's namespace, or "
                                  "one another VM carries, is refused; without a path the container gets "
                                  "a new namespace (what prestart hooks put there is carried); none in "
                                  "the spec (a VM cannot share the host's network) gives loopback only",
            "io.kata-py.rootfs": "virtio-9p share of the bundle rootfs",
        },
    }


def cmd_features(args) -> int:
    print(json.dumps(features(), indent=2))
    return 0
