"""kata-py: a VM-backed OCI container runtime."""

__version__ = "0.1.0"
