"""TLS credentials for a TCP migration channel, in QEMU's tls-creds-x509 layout: a
directory with ca-cert.pem, the target's server-cert.pem and server-key.pem, the
source's client-cert.pem and client-key.pem. Both ends verify the other against
the CA: mutual TLS, 1.2 or later. A private CA is the trust; the peer's host name
is not checked (a migration target is named by address, not by name)."""

import os
import ssl

from fdmig.errors import SpecError

CA = "ca-cert.pem"
FILES = {"server": ("server-cert.pem", "server-key.pem"), "client": ("client-cert.pem", "client-key.pem")}


def check(directory: str, role: str) -> None:
    """SpecError naming the first file `role` ("server", "client") needs that is missing."""
    for name in (CA, *FILES[role]):
        if not os.path.isfile(os.path.join(directory, name)):
            raise SpecError(f"--tls-creds {directory}: {name} is missing; accepted: a directory with {CA}, "
                            f"{' and '.join(FILES[role])} (QEMU's tls-creds-x509 layout)")


def context(directory: str, role: str) -> ssl.SSLContext:
    """The SSLContext of the target ("server") or the source ("client")."""
    check(directory, role)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if role == "server" else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED  # the other end must show a certificate from the CA too
    try:
        ctx.load_verify_locations(os.path.join(directory, CA))
        cert, key = FILES[role]
        ctx.load_cert_chain(os.path.join(directory, cert), os.path.join(directory, key))
    except (ssl.SSLError, OSError) as exc:
        raise SpecError(f"--tls-creds {directory}: cannot load the credentials: {exc}") from None
    return ctx
