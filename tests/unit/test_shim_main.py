"""The shim binary's command line (Go's flag syntax, as containerd passes it)
and how containers are grouped into one shim per pod."""

import json

import pytest

from kata_py.shim import main as shim


def test_go_style_flags_and_the_action():
    args = shim.parse(["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock",
                       "-publish-binary", "/usr/bin/containerd", "-id", "abc", "-debug", "start"])
    assert (args.namespace, args.address, args.publish_binary, args.id, args.debug, args.action) == \
        ("k8s.io", "/run/containerd/containerd.sock", "/usr/bin/containerd", "abc", True, "start")
    args = shim.parse(["--namespace=default", "-id=x", "-bundle", "/b", "delete"])
    assert (args.namespace, args.id, args.bundle, args.action, args.debug) == ("default", "x", "/b", "delete", False)


@pytest.mark.parametrize("argv,message", [(["-bogus", "1"], "not defined: -bogus"),
                                          (["-id"], "needs an argument: -id")])
def test_bad_flags_are_refused_as_go_does(argv, message):
    with pytest.raises(SystemExit, match=message):
        shim.parse(argv)


def test_containers_of_a_cri_pod_share_the_sandbox_shim(tmp_path):
    sandbox, workload, alone = (tmp_path / n for n in ("sandbox", "workload", "alone"))
    for bundle, annotations in ((sandbox, {"io.kubernetes.cri.container-type": "sandbox",
                                           "io.kubernetes.cri.sandbox-id": "pod1"}),
                                (workload, {"io.kubernetes.cri.container-type": "container",
                                            "io.kubernetes.cri.sandbox-id": "pod1"}),
                                (alone, {})):
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"annotations": annotations}))
    assert shim.pod_of(sandbox, "pod1") == shim.pod_of(workload, "c2") == "pod1"
    assert shim.pod_of(alone, "solo") == "solo"
    assert shim.pod_of(tmp_path / "missing", "x") == "x"
    key = shim.pod_key("k8s.io", "pod1")
    assert key == shim.pod_key("k8s.io", "pod1") != shim.pod_key("default", "pod1")
    assert len(str(shim.socket_path(key))) < 108      # a Unix socket path's limit
