"""The escape-probe harness: a battery of probes run inside a container of
a chosen runtime (kata-py, runc, crun, ...), each one trying to reach the
host, each verdict decided from evidence the host gathers itself.

probe.py     what a probe is (a script + host checks) and its verdict
host.py      the host side: canaries, a marker process, listeners, snapshots
*_probes.py  the probes, as data
catalog.py   the battery, in the order it runs
runtime.py   a runc-compatible runtime driven through its CLI
bundle.py    the container the probes run in
runner.py    runs a battery and gathers the report
report.py    the report as a table or JSON
"""
