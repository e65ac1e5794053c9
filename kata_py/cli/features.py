"""`kata-py features`: what this runtime implements, in runc's features JSON."""

import json


def add_parser(sub) -> None:
    parser = sub.add_parser("features", help="show the enabled features")
    parser.set_defaults(func=cmd_features)


def _agent_tables() -> dict:
    """What the guest agent implements, from its own tables (the agent's
    sources ship with kata-py: they go into the guest image)."""
    import sys

    from ..paths import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "agent"))
    try:
        from kata_agent import credentials, mounts, seccomp
    finally:
        sys.path.pop(0)
    return {"mount_options": sorted(mounts.FLAG_OPTIONS) + sorted(mounts.PROPAGATION_OPTIONS),
            "capabilities": list(credentials.CAPABILITIES), "actions": sorted(seccomp.ACTIONS),
            "operators": sorted(seccomp.OPERATORS), "archs": sorted(seccomp.ARCHITECTURES)}


def features() -> dict:
    agent = _agent_tables()
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.0.2",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": agent["mount_options"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": agent["capabilities"],
            "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True, "actions": agent["actions"], "operators": agent["operators"],
                        "archs": agent["archs"]},
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
