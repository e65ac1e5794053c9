"""The kata-py guest agent: PID 1 inside the sandbox VM."""

AGENT_VERSION = "0.1.0"
