"""The VM factory: a pool of booted, idle sandbox VMs that `create` takes from.

Kata calls it the VM cache. Each pooled VM is kept by its own *standby*
process (standby.py), which boots it exactly as a container's monitor would —
its 9p export empty, waiting for a rootfs — and hands it to exactly one
container monitor, then ends it when that monitor lets go or dies. The
*factory* daemon (daemon.py) keeps the pool filled and answers
`kata-py factory status|stop`. A VM is never used twice: a claimed standby
stops listening, and its VM is destroyed with the container. What a monitor
uses to claim a pooled VM, and the line protocol both sides speak, are the
sandbox layer's: kata_py.sandbox.pool and kata_py.sandbox.pool_wire.
"""
