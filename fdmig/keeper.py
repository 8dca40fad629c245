"""--fdstore: a copy of every chardev's fds in this instance's own service
manager's fd store (sd_notify FDSTORE=1 to $NOTIFY_SOCKET: systemd's, or an outer
`fdmig run`'s), named by label (a server's listener LABEL.listener), so that an
instance killed outright and started again by its manager adopts them back
(Chardev.open_saved) and every peer is served again. Bytes read and not yet
delivered die with the instance; a `hold` chardev loses nothing."""

import logging
import os

from fdmig import systemd

log = logging.getLogger("fdmig")


def names(label: str) -> tuple[str, str]:
    """The store names of a chardev's (listener, connection)."""
    return f"{label}.listener", label


class Keeper:
    def __init__(self):
        self.kept: dict[str, object] = {}  # store name -> the socket object stored under it
        # Without a manager there is no store to keep copies in; fds passed back at
        # start are still taken up.
        self.storing = bool(os.environ.get("NOTIFY_SOCKET"))
        if not self.storing:
            log.warning("--fdstore: no $NOTIFY_SOCKET, so no service manager keeps this instance's fds")

    def sync(self, chardev) -> None:
        """After any change of the chardev: the store holds what it holds now. What
        was taken up at start is stored again, which both managers take as the
        same open file, kept once."""
        if not self.storing:
            return
        for name, sock in zip(names(chardev.label), (chardev.listener, chardev.conn)):
            if self.kept.get(name) is sock:
                continue
            if name in self.kept:
                del self.kept[name]
                systemd.notify("FDSTOREREMOVE=1", f"FDNAME={name}")
            if sock is not None:
                if systemd.notify("FDSTORE=1", f"FDNAME={name}", fds=(sock.fileno(),)):
                    self.kept[name] = sock
                else:
                    log.warning("chardev %s: its manager's fd store did not take %s", chardev.label, name)

    def forget(self, label: str) -> None:
        for name in names(label):
            if self.kept.pop(name, None) is not None:
                systemd.notify("FDSTOREREMOVE=1", f"FDNAME={name}")
