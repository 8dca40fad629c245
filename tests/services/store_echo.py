"""A service written for systemd's fd store: it takes its listeners and its stored
connections from LISTEN_FDS, echoes on every connection, stores each connection it
accepts (FDSTORE=1, FDNAME=conn-<n>) the moment it accepts it, and removes one from
the store (FDSTOREREMOVE=1) when its peer is done. So its connections outlive it.

  python3 -m tests.services.store_echo [--greet] [--fail-if-exists PATH] [--hang-if-exists PATH]

--greet: write "<pid>\\n" to each connection it accepts (which service served it).
--fail-if-exists: exit 1 at start while PATH exists (a start that fails).
--hang-if-exists: never become ready while PATH exists.
SIGTERM/SIGINT: stop (exit 0) once what was read is echoed. SIGUSR1: fail (exit 3).
"""

import argparse
import os
import selectors
import signal
import socket
import sys
import time

from tests.services import libsd


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--greet", action="store_true")
    parser.add_argument("--fail-if-exists")
    parser.add_argument("--hang-if-exists")
    args = parser.parse_args()
    if args.fail_if_exists and os.path.exists(args.fail_if_exists):
        print(f"store_echo {os.getpid()}: failing at start, {args.fail_if_exists} exists", file=sys.stderr)
        return 1
    if args.hang_if_exists and os.path.exists(args.hang_if_exists):
        print(f"store_echo {os.getpid()}: never ready, {args.hang_if_exists} exists", file=sys.stderr)
        while True:
            time.sleep(3600)

    # Signals only set a flag, woken through a pipe: an accepted connection is
    # always stored, and bytes read are always echoed, before the service exits.
    stop = []
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, lambda signum, frame: stop.append(signum))

    selector = selectors.DefaultSelector()
    selector.register(wake_r, selectors.EVENT_READ, ("wake", None))
    numbers = [0]
    for fd, name in libsd.listen_fds():
        sock = socket.socket(fileno=fd)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            selector.register(sock, selectors.EVENT_READ, ("listener", name))
        else:
            selector.register(sock, selectors.EVENT_READ, ("conn", name))
            if name.startswith("conn-"):
                numbers.append(int(name[5:]))
    next_number = max(numbers) + 1
    libsd.notify(f"READY=1\nSTATUS=echoing, pid {os.getpid()}")

    while not stop:
        for key, _ in selector.select():
            kind, name = key.data
            if kind == "wake":
                os.read(wake_r, 512)
            elif kind == "listener":
                conn, _ = key.fileobj.accept()
                conn.setblocking(True)
                name = f"conn-{next_number}"
                next_number += 1
                libsd.notify(f"FDSTORE=1\nFDNAME={name}", [conn.fileno()])
                if args.greet:
                    conn.sendall(b"%d\n" % os.getpid())
                selector.register(conn, selectors.EVENT_READ, ("conn", name))
            else:
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                    if data:
                        conn.sendall(data)
                except ConnectionError:
                    data = b""
                if not data:
                    libsd.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
                    selector.unregister(conn)
                    conn.close()
    return 3 if signal.SIGUSR1 in stop else 0


if __name__ == "__main__":
    sys.exit(main())
