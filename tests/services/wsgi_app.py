"""A WSGI application for gunicorn under `fdmig run`: it answers with the pid of
the worker that served the request."""

import os


def app(environ, start_response):
    body = b"served by %d\n" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
