"""A TCP echo server, a thread per connection: a backend for a proxy under test.

  python3 -m tests.services.tcp_echo    (prints the port it listens on, 127.0.0.1)"""

import socket
import sys
import threading


def echo(conn: socket.socket) -> None:
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


def main() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
