"""containerd shim v2 (runtime type io.containerd.kata-py.v2): ttrpc, the Task service, events."""
