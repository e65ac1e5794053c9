"""How big a pod's VM is: the CRI's pod annotations, else the first
container's resources, at least the pod default."""

import pytest

from kata_py.oci.process_spec import GUEST_OVERHEAD_MIB
from kata_py.shim.pod import POD_MEMORY_MIB, PodError, pod_vm_size


def spec(annotations=None, limit=None, quota=None):
    resources = {}
    if limit:
        resources["memory"] = {"limit": limit}
    if quota:
        resources["cpu"] = {"quota": quota, "period": 100000}
    return {"annotations": annotations or {}, "linux": {"resources": resources}}


def test_without_pod_figures_a_pod_gets_the_default():
    assert pod_vm_size(spec()) == (POD_MEMORY_MIB, 1)


def test_the_pod_annotations_size_the_vm():
    memory, cpus = pod_vm_size(spec({"io.kubernetes.cri.sandbox-memory": str(1 << 30),
                                     "io.kubernetes.cri.sandbox-cpu-quota": "150000",
                                     "io.kubernetes.cri.sandbox-cpu-period": "100000"}))
    assert memory == 1024 + GUEST_OVERHEAD_MIB
    assert cpus == min(2, __import__("os").cpu_count())


def test_a_container_limit_larger_than_the_default_wins():
    assert pod_vm_size(spec(limit=2 << 30))[0] == 2048 + GUEST_OVERHEAD_MIB


@pytest.mark.parametrize("annotations", [{"io.kubernetes.cri.sandbox-memory": "lots"},
                                         {"io.kubernetes.cri.sandbox-memory": str(1 << 50)}])
def test_bad_or_huge_pod_figures_are_refused(annotations):
    with pytest.raises(PodError):
        pod_vm_size(spec(annotations))


def test_a_container_that_does_not_fit_the_pods_vm_is_refused(tmp_path):
    from kata_py.shim.pod import Pod

    pod = Pod("p", lambda *a, **k: None, tmp_path)
    pod.memory_mib = POD_MEMORY_MIB
    pod._check_size(spec(limit=(POD_MEMORY_MIB - GUEST_OVERHEAD_MIB) << 20))     # fits exactly
    with pytest.raises(PodError, match=f"has {POD_MEMORY_MIB} MiB"):
        pod._check_size(spec(limit=POD_MEMORY_MIB << 20))
