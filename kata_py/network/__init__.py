"""Container networking: the VM joins the container's network namespace
(Kata's tcfilter model: a tap beside each veth, tc mirred both ways)."""

from .attach import Attachment, GuestNic, attach, detach_recorded, namespace_path
from .errors import NetworkError
from .guard import (HostNamespaceRefused, NamespaceCarried, NewNamespace, is_pod_sandbox, monitor_namespace,
                    network_entry, open_carriable)
from .lifecycle import (RECORD_NAME, attach_container, configure_guest, detach_container,
                        detach_container_recorded)

__all__ = ["Attachment", "GuestNic", "HostNamespaceRefused", "NamespaceCarried", "NetworkError",
           "NewNamespace", "is_pod_sandbox", "monitor_namespace", "network_entry", "open_carriable", "RECORD_NAME", "attach", "attach_container",
           "configure_guest", "detach_container", "detach_container_recorded", "detach_recorded",
           "namespace_path"]
