"""Run the guest agent's server on a Unix socket on the host, for unit tests.

The agent's logic (process table, stdio streams, RPC handling) is the same
code that runs as PID 1 in the guest; only the listener differs. Run as a
separate process because the agent reaps every child with waitpid(-1).
"""

import socket
import sys
import threading
from pathlib import Path

sys.path[0:0] = [str(Path(__file__).resolve().parent.parent / "agent")]

from kata_agent.handlers import Handlers  # noqa: E402
from kata_agent.processes import ProcessTable  # noqa: E402
from kata_agent.server import Server  # noqa: E402


def main(path: str) -> None:
    table = ProcessTable()
    server = Server(table, Handlers(table, power_off=lambda: sys.exit(0)))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    threading.Thread(target=table.reap_forever, daemon=True).start()
    print("ready", flush=True)
    server.serve_forever(listener)


if __name__ == "__main__":
    main(sys.argv[1])
