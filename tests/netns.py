"""Hosts for cross-host tests: network namespaces this process makes and removes,
a client, host A and host B, each with one veth end on a bridge in a fourth
namespace. Every address is in 198.18.0.0/15 (RFC 2544's benchmarking range) and
lives inside these namespaces only: nothing here can reach any other network.

    client 198.18.0.1   host A 198.18.0.2   host B 198.18.0.3
    the service address 198.18.0.10, on A to begin with; it moves."""

import ctypes
import os
import socket
import subprocess
import threading
import uuid

from tests.helpers import missing

CLIENT, HOST_A, HOST_B = "198.18.0.1", "198.18.0.2", "198.18.0.3"
SERVICE = "198.18.0.10"
PREFIX = 24
SUBNET = f"198.18.0.0/{PREFIX}"
# The commands a user gives fdmig to move the service address, as shell lines: an
# instance runs them on its own host (here, in its namespace). The claim ends with
# a gratuitous ARP, so that the neighbours send to this host before the connections
# resume. arping then waits a second for replies an unsolicited ARP never gets:
# `timeout` interrupts it once the announcement is out (arping sends within a few
# ms of its start; its exit status says nothing either way).
RELEASE = f"ip addr del {SERVICE}/{PREFIX} dev eth0"


def claim(wait: float = 0.05, signal: str = "INT") -> str:
    """With `signal` KILL, arping ends at once (INT lets it tidy up, a few ms more),
    but the shell then says "Killed" on stderr: that goes to /dev/null, with
    whatever arping had to say."""
    quiet = " 2>/dev/null" if signal == "KILL" else ""
    return (f"ip addr replace {SERVICE}/{PREFIX} dev eth0 && "
            f"{{ timeout -s {signal} {wait} arping -q -c 1 -U -I eth0 {SERVICE} || true; }}{quiet}")


CLAIM = claim()

# The programs these hosts run (besides sh and timeout).
PROGRAMS = ("ip", "arping")


def unavailable(check_programs: bool = True) -> str | None:
    """Why these tests cannot run here, or None. With check_programs False, missing
    PROGRAMS are left to the test's needs(*netns.PROGRAMS) mark (tests/helpers.py),
    under which CI fails rather than skips."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    why = missing(*PROGRAMS)
    if why is not None:
        return why if check_programs else None
    probe = f"fdmig-probe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(name: str, fn, *args):
    """fn(*args) in a thread that has entered network namespace `name` (setns acts
    on the calling thread only): a socket it makes stays in that namespace."""
    outcome = {}

    def enter_and_call():
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=enter_and_call)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """The namespaces, made on enter and removed on exit. `ns(host)` is the netns
    name of "client", "a" or "b"; `wrap(host, argv)` runs argv there."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.names = {host: f"fdmig-{tag}-{host}" for host in ("switch", "client", "a", "b")}

    def ns(self, host: str) -> str:
        return self.names[host]

    def wrap(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[host], *argv]

    def connect(self, host: str, address: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection made from `host`'s namespace."""
        return in_netns(self.names[host], socket.create_connection, (address, port), timeout)

    def __enter__(self) -> "Hosts":
        try:
            for name in self.names.values():
                _ip("netns", "add", name)
                _ip("-n", name, "link", "set", "lo", "up")
            switch = self.names["switch"]
            _ip("-n", switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", switch, "link", "set", "br0", "up")
            for index, (host, address) in enumerate((("client", CLIENT), ("a", HOST_A), ("b", HOST_B))):
                inner, outer = "eth0", f"port{index}"
                _ip("-n", switch, "link", "add", outer, "type", "veth", "peer", "name", inner,
                    "netns", self.names[host])
                _ip("-n", switch, "link", "set", outer, "master", "br0", "up")
                _ip("-n", self.names[host], "addr", "add", f"{address}/{PREFIX}", "dev", inner)
                _ip("-n", self.names[host], "link", "set", inner, "up")
            self.add_service_address("a")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc) -> None:
        for name in self.names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def run_on(self, host: str, command: str) -> None:
        """A shell command line run on `host` (in its namespace)."""
        subprocess.run(self.wrap(host, ["sh", "-c", command]), check=True, capture_output=True)

    def add_service_address(self, host: str) -> None:
        _ip("-n", self.names[host], "addr", "add", f"{SERVICE}/{PREFIX}", "dev", "eth0")

    def has_service_address(self, host: str) -> bool:
        out = subprocess.run(["ip", "-n", self.names[host], "-o", "addr", "show", "dev", "eth0"],
                             capture_output=True, text=True, check=True).stdout
        return f" {SERVICE}/" in out
