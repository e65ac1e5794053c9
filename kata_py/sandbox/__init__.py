"""A sandbox: one VM, its vsock host end, and the connection to its agent."""
