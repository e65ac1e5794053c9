"""The network layer's own error."""

from ..errors import KataError


class NetworkError(KataError):
    """The container's network namespace could not be read, or carried into the VM."""
