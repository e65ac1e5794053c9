"""Host end of vsock: kernel vhost-vsock, or kata-py's own vhost-user-vsock back end
exposing Firecracker's hybrid vsock contract on a Unix socket."""

from .transport import HybridVsock, KernelVsock, VsockTransport, choose_transport

__all__ = ["HybridVsock", "KernelVsock", "VsockTransport", "choose_transport"]
