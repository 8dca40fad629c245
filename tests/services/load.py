"""HTTP load from a process of its own (in the test's process, the GIL would be
what gets measured): a GET over a fresh connection every INTERVAL seconds, and
one JSON line per request on stdout, as it ends:

  python3 -m tests.services.load PORT [PATH] [INTERVAL]

  {"start": T, "ms": M, "ok": true, "by": "MASTER WORKER"}  or  {..., "ok": false, "error": E}

It runs until SIGTERM or stdin closes. Requests overlap when one takes longer
than the interval: each runs in a thread of its own, as independent clients do."""

import http.client
import json
import os
import sys
import threading
import time


def request(port: int, path: str, out, lock) -> None:
    start = time.time()
    began = time.monotonic()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
        conn.close()
        result = {"ok": response.status == 200, "by": body.strip().removeprefix("served by ")}
        if response.status != 200:
            result["error"] = f"HTTP {response.status}"
    except Exception as exc:  # a failed request is what the test counts
        result = {"ok": False, "error": repr(exc)}
    result.update(start=start, ms=round((time.monotonic() - began) * 1000, 3))
    with lock:
        try:
            out.write(json.dumps(result) + "\n")
            out.flush()
        except (BrokenPipeError, ValueError):
            pass  # the reader has gone: it wants no more results


def main() -> None:
    port = int(sys.argv[1])
    path = sys.argv[2] if len(sys.argv) > 2 else "/"
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.01
    lock = threading.Lock()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    threads = []
    while not stop.is_set():
        thread = threading.Thread(target=request, args=(port, path, sys.stdout, lock))
        thread.start()
        threads.append(thread)
        threads = [t for t in threads if t.is_alive()]
        stop.wait(interval)
    for thread in threads:
        thread.join(70)
    os._exit(0)


if __name__ == "__main__":
    main()
