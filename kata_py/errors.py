"""One root error for the whole runtime, with typed subclasses that carry fields.

The CLI turns any KataError into one line on stderr and a non-zero exit; anything
else is a bug and gets a traceback.
"""

from __future__ import annotations


class KataError(Exception):
    """Root of every error kata-py raises on purpose."""

    exit_code = 1


class ConfigError(KataError):
    """Bad user input: flags, config file, bundle."""


class ImageError(KataError):
    """The guest image could not be built or found."""


class VMLaunchError(KataError):
    """QEMU failed to start or died before the guest was usable."""

    def __init__(self, message: str, *, argv: list[str] | None = None,
                 exit_code: int | None = None, console_tail: str = "") -> None:
        self.argv = list(argv or [])
        self.qemu_exit_code = exit_code
        self.console_tail = console_tail
        detail = message
        if exit_code is not None:
            detail += f" (qemu exit code {exit_code})"
        super().__init__(detail)

    def full_report(self) -> str:
        """Everything a user needs to debug a failed launch, for --debug and logs."""
        lines = [str(self), "command line: " + " ".join(self.argv)]
        if self.console_tail:
            lines.append("console tail:\n" + self.console_tail)
        return "\n".join(lines)


class HostCgroupError(KataError):
    """The host cgroup that bounds a VM's QEMU (memory, tasks) could not be made."""


class AgentError(KataError):
    """The guest agent refused a request, or answered something invalid."""


class AgentTimeout(AgentError):
    """The guest agent did not answer in time."""


class ProtocolError(AgentError):
    """A frame or message broke the wire protocol (size, JSON, schema)."""


class VsockError(KataError):
    """The host end of vsock failed (backend died, connection refused)."""
