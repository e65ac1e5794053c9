"""A module for tests/unit/test_forked.py to start: it writes what it finds
about its own process to the file named by its first argument."""

import json
import os
import signal
import sys


def main(argv: list[str]) -> None:
    out, status = argv[0], int(argv[1])
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    with open(out, "w") as f:
        json.dump({"sid": os.getsid(0), "pid": os.getpid(), "fds": fds, "argv": sys.argv,
                   "cmdline": open("/proc/self/cmdline", "rb").read().decode(errors="replace"),
                   "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                   "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))}, f)
    sys.exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
