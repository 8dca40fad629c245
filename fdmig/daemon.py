"""The instance: owns the chardevs, serves the control socket, runs migrations.

Everything runs on one asyncio loop; signal handlers only set an event and the loop
acts on it (gunicorn's and aiohttp's way of shutting down).
"""

import asyncio
import logging
import os
import resource
import signal
import socket
import time

from fdmig import __version__, frontends, spec as specs, systemd
from fdmig.chardev import Chardev, State
from fdmig.errors import FdmigError, SpecError

log = logging.getLogger("fdmig")
CAPABILITIES = ("local-char-socket",)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Instance:
    def __init__(self, name: str, control_path: str, capabilities=(), incoming: bool = False):
        self.name = name
        self.control_path = control_path
        self.capabilities = {cap: cap in capabilities for cap in CAPABILITIES}
        self.run_state = "inmigrate" if incoming else "running"
        self.chardevs: dict[str, Chardev] = {}
        self.named_fds: dict[str, int] = {}  # getfd store, as QEMU's monitor keeps one
        self.listen_fds: dict[str, list[int]] = {}
        self.started = time.time()
        self.migration = {"status": "none", "chardevs": 0, "downtime-ms": None, "total-ms": None,
                          "setup-ms": None, "error": None}
        self.stopping = asyncio.Event()
        self.control = None  # control.ControlServer
        self.exit_code = 0

    # ----- chardevs ----------------------------------------------------------

    def check_new(self, spec) -> None:
        """Rules a chardev-add must pass against what the instance already holds."""
        if spec.id in self.chardevs:
            raise SpecError(f"chardev id: duplicate label '{spec.id}'; each chardev needs its own id")
        if spec.local_incoming and self.run_state != "inmigrate":
            raise SpecError(f"chardev local-incoming: only an incoming instance (migrate-in) waits for "
                            f"a migrated fd; '{spec.id}' is on a running instance")
        existing = [c.spec for c in self.chardevs.values()]
        specs.check_set(existing + [spec])

    async def add_chardev(self, spec, adopted_fd: int | None = None) -> Chardev:
        self.check_new(spec)
        if adopted_fd is None and spec.kind in ("fd", "fdname"):
            adopted_fd = self._take_fd(spec)
        chardev = Chardev(spec, self._chardev_changed)
        self._wire(chardev)
        self.chardevs[spec.id] = chardev
        try:
            await chardev.open(adopted_fd)
        except BaseException:
            self._unwire(chardev)
            del self.chardevs[spec.id]
            if adopted_fd is not None:
                os.close(adopted_fd)
            raise
        log.info("chardev %s: %s %s (%s)", spec.id, spec.role, spec.address, chardev.state.value)
        self.report_status()
        return chardev

    def _take_fd(self, spec) -> int:
        if spec.kind == "fdname":
            fds = self.listen_fds.get(spec.fdname)
            if not fds:
                have = ", ".join(sorted(self.listen_fds)) or "none"
                raise FdmigError(f"chardev {spec.id}: no socket-activation fd named '{spec.fdname}' "
                                 f"(LISTEN_FDNAMES has: {have})")
            return fds.pop(0)
        if spec.fd.isdigit():
            return int(spec.fd)
        if spec.fd not in self.named_fds:
            raise FdmigError(f"chardev {spec.id}: File descriptor named '{spec.fd}' not found "
                             "(pass one with getfd first)")
        return self.named_fds.pop(spec.fd)

    def _wire(self, chardev: Chardev) -> None:
        spec = chardev.spec
        if spec.bridge:
            partner = self.chardevs[spec.bridge]
            chardev.frontend = frontends.Bridge(chardev, partner)
            partner.frontend = frontends.Bridge(partner, chardev)
            chardev.feeders.append(partner)
            partner.feeders.append(chardev)
            partner.update_io()
        else:
            chardev.frontend = frontends.make(chardev)

    def _unwire(self, chardev: Chardev) -> None:
        if chardev.spec.bridge and chardev.spec.bridge in self.chardevs:
            partner = self.chardevs[chardev.spec.bridge]
            partner.frontend = frontends.Hold(partner)
            partner.feeders.remove(chardev)
            partner.update_io()

    def bridged_by(self, label: str) -> str | None:
        for other in self.chardevs.values():
            if other.spec.bridge == label:
                return other.label
        return None

    def remove_chardev(self, label: str) -> None:
        chardev = self.chardevs.get(label)
        if chardev is None:
            raise FdmigError(f"Chardev '{label}' not found")
        user = self.bridged_by(label)
        if user is not None:
            raise FdmigError(f"Chardev '{label}' is busy: chardev '{user}' bridges to it; detach '{user}' first")
        self._unwire(chardev)
        del self.chardevs[label]
        chardev.close()
        log.info("chardev %s: removed", label)
        self.report_status()

    def _chardev_changed(self, chardev: Chardev) -> None:
        if self.control is not None:
            self.control.broadcast("X_FDMIG_CHARDEV_STATE", {"label": chardev.label, "state": chardev.state.value})
        self.report_status()

    # ----- reporting ---------------------------------------------------------

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for chardev in self.chardevs.values():
            counts[chardev.state.value] = counts.get(chardev.state.value, 0) + 1
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no chardevs"
        return f"{self.run_state}: {states}"

    def report_status(self) -> None:
        if os.environ.get("NOTIFY_SOCKET"):
            systemd.notify(f"STATUS={self.summary()}")

    def status(self) -> dict:
        import psutil
        me = psutil.Process()
        return {
            "name": self.name,
            "pid": os.getpid(),
            "state": self.run_state,
            "version": __version__,
            "uptime-s": round(time.time() - self.started, 3),
            "rss-bytes": me.memory_info().rss,
            "open-fds": me.num_fds(),
            "capabilities": dict(self.capabilities),
            "migration": dict(self.migration),
            "control": self.control_path,
            "chardevs": [c.status() for c in self.chardevs.values()],
        }

    # ----- life cycle --------------------------------------------------------

    async def start(self, chardev_specs) -> None:
        """Open the control socket and the chardevs; READY=1 once they are open."""
        from fdmig.control import ControlServer
        raise_fd_limit()
        self.listen_fds = systemd.listen_fds()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.control = ControlServer(self)
        self.control.bind(self.control_path)
        # A bridge is wired to a partner that is already there: plain chardevs first.
        for spec in sorted(chardev_specs, key=lambda s: s.bridge is not None):
            await self.add_chardev(spec)
        self.control.start()
        waiting = [c.first_peer.wait() for c in self.chardevs.values() if c.spec.wait]
        if waiting:
            log.info("waiting for the first peer of %d chardev(s) (wait=on)", len(waiting))
            systemd.notify(f"STATUS=waiting for the first peer of {len(waiting)} chardev(s)")
            await asyncio.wait([asyncio.ensure_future(w) for w in waiting] +
                               [asyncio.ensure_future(self.stopping.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if not self.stopping.is_set():
                await asyncio.gather(*[c.first_peer.wait() for c in self.chardevs.values() if c.spec.wait])
        if not self.stopping.is_set():
            systemd.notify("READY=1", f"STATUS={self.summary()}")
            log.info("instance %s ready (pid %d, control %s)", self.name, os.getpid(), self.control_path)

    async def serve_forever(self) -> int:
        await self.stopping.wait()
        return self.exit_code

    def shutdown(self, unlink: bool = True) -> None:
        """Staged: stop accepting control clients, close chardevs, remove own sockets."""
        systemd.notify("STOPPING=1")
        if self.control is not None:
            self.control.close(unlink=unlink)
        for chardev in list(self.chardevs.values()):
            try:
                chardev.close(unlink=unlink)
            except Exception:
                log.exception("chardev %s: error while closing", chardev.label)
        for fd in self.named_fds.values():
            os.close(fd)
        self.named_fds.clear()


async def run_instance(instance: Instance, chardev_specs) -> int:
    try:
        await instance.start(chardev_specs)
        return await instance.serve_forever()
    finally:
        instance.shutdown()


def run(instance: Instance, chardev_specs) -> int:
    return asyncio.run(run_instance(instance, chardev_specs))
