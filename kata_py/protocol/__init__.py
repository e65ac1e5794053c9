"""The wire protocol between the host runtime and the guest agent.

This package is copied into the guest image verbatim, so it must import only
the Python standard library, and only the parts the guest image carries.
"""

AGENT_PORT = 1024
PROTOCOL_VERSION = 1
