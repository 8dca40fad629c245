"""The copier of a `run` instance's service's stderr, run as a script by the
instance (python3 -I -S stderrcopy.py MAX), one per start of the service:

  fd 0  the pipe the service writes its stderr to
  fd 2  fdmig run's own stderr, where every byte goes on, unchanged
  fd 3  where the last non-empty line (at most MAX bytes) is written at the end

It ends when the service and every child of it have closed the pipe. It ignores
the signals a terminal or a stopping unit sends, so the service's last words are
never lost to them; if run's stderr goes away it drains on, so the service never
blocks on a full pipe. Standard library only: nothing of fdmig is imported.
"""

import os
import signal
import sys


def main() -> None:
    # Nothing but its three: should the instance have let an fd be inherited, a
    # copy here would keep a connection open after the instance closed it.
    os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)
    last, pending, writing = b"", b"", True
    while True:
        try:
            data = os.read(0, 65536)
        except OSError:
            break
        if not data:
            break
        view = memoryview(data)
        while writing and view:
            try:
                view = view[os.write(2, view):]
            except OSError:
                writing = False
        lines = (pending + data).split(b"\n")
        pending = lines.pop()[-limit:]
        for line in reversed(lines):
            if line.strip():
                last = line[-limit:]
                break
    if pending.strip():
        last = pending
    try:
        os.write(3, last)
    except OSError:
        pass


if __name__ == "__main__":
    main()
