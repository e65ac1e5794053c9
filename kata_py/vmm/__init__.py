"""The VMM layer: QEMU command lines, launching, QMP, shutdown, host probing."""
