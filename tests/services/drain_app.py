"""An application for the servers people run (gunicorn as WSGI, uvicorn as
ASGI), under `fdmig run --overlap`: it answers with the pids that served the
request ("MASTER WORKER": the same pid twice for a server of one process), and /slow?S after S seconds, a request in flight
while a restart's old generation drains.

Where $DRAIN_APP_BEGUN names a directory, a slow request makes a file there as
it begins (named by the worker's pid): the test's sign that it is in flight.

A deploy that does not start: where the file $DRAIN_APP_BROKEN names exists, the
import raises (a broken build); where $DRAIN_APP_HANG names one, it never ends
(a build that never becomes ready)."""

import asyncio
import os
import time


def _flag(name: str) -> bool:
    path = os.environ.get(name)
    return bool(path) and os.path.exists(path)


if _flag("DRAIN_APP_BROKEN"):
    raise RuntimeError("this build is broken")
while _flag("DRAIN_APP_HANG"):
    time.sleep(0.1)


def _body(master: int) -> bytes:
    return b"served by %d %d\n" % (master, os.getpid())


def _begun() -> None:
    directory = os.environ.get("DRAIN_APP_BEGUN")
    if directory:
        with open(os.path.join(directory, str(os.getpid())), "w"):
            pass


def _delay(query: str) -> float:
    try:
        return float(query or 3)
    except ValueError:
        return 3.0


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/slow":
        _begun()
        time.sleep(_delay(environ.get("QUERY_STRING", "")))
    body = _body(os.getppid())  # gunicorn: a worker, whose parent is the master
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        _begun()
        await asyncio.sleep(_delay(scope.get("query_string", b"").decode()))
    body = _body(os.getpid())  # uvicorn: one process
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
