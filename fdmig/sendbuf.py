"""Writing a buffer to a non-blocking socket: the one way chardevs and control
connections drain what they hold for their peer."""

import socket


def send_some(sock: socket.socket, buf: bytearray) -> int:
    """Send what the socket takes of `buf` now, and cut that from `buf`. Any
    OSError but would-block is the caller's: its connection is over."""
    try:
        sent = sock.send(buf)
    except (BlockingIOError, InterruptedError):
        return 0
    del buf[:sent]
    return sent
