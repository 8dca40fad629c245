"""Migration over a TCP channel with mutual TLS, with real processes on loopback:
certificates made with the openssl command line in QEMU's tls-creds-x509 layout,
each end refusing a peer whose certificate the CA did not sign before any
migration frame, no plaintext TCP channel, and remote semantics (the capability
off: every chardev opened afresh at the target, its peers reconnecting)."""

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import types

import pytest

from fdmig import paths, qmp
from fdmig.migration import wire
from tests.helpers import (connect_unix, echoes, free_port, listener, read_event, require, run, send_chunks,
                           status_of, wait_states)

ECHO = "socket,id=app,path={path},server=on,frontend=echo"
NO_TLS_CREDS = "a TCP channel needs --tls-creds DIR"

# What each end reads from its DIR (QEMU's tls-creds-x509 names).
SOURCE_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")
TARGET_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
"""


def openssl(*args, cwd) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def make_ca(work, name: str, subject: str) -> None:
    """{name}-cert.pem and {name}-key.pem in `work`: a self-signed CA (EC P-256)."""
    openssl("req", "-x509", "-config", "openssl.cnf", "-extensions", "ca", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}-key.pem",
            "-out", f"{name}-cert.pem", "-days", "2", "-subj", f"/CN={subject}", cwd=work)


def make_leaf(work, ca: str, name: str, kind: str, subject: str, serial: int) -> None:
    """{name}-cert.pem and {name}-key.pem in `work`: a `kind` (server|client)
    certificate that the CA `ca` signs. No subjectAltName: the peer's host name
    is not what either end checks, only the chain."""
    openssl("req", "-new", "-config", "openssl.cnf", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={subject}", cwd=work)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
            "-set_serial", str(serial), "-days", "2", "-extfile", "openssl.cnf", "-extensions", kind,
            "-out", f"{name}-cert.pem", cwd=work)


def make_creds_dir(path, **files) -> str:
    """A tls-creds DIR holding exactly the QEMU file names given, copied from the sources."""
    os.makedirs(path, mode=0o700)
    for name, source in files.items():
        target = os.path.join(path, name.replace("_", "-") + ".pem")
        shutil.copyfile(source, target)
        os.chmod(target, 0o600)
    return str(path)


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    """Two CAs and their certificates, and the tls-creds DIRs made of them:
    `target` and `source` as the two hosts of a migration each hold theirs
    (the CA and their own key only), `both` for a --spawn on one host, and
    `foreign`: the right CA, but a client certificate that the other CA signed."""
    require("openssl")
    base = tmp_path_factory.mktemp("tls")
    work = base / "work"
    work.mkdir()
    (work / "openssl.cnf").write_text(_OPENSSL_CNF)
    make_ca(work, "ca", "fdmig test CA")
    make_leaf(work, "ca", "server", "server", "fdmig target", 1)
    make_leaf(work, "ca", "client", "client", "fdmig source", 2)
    make_ca(work, "other-ca", "another CA")
    make_leaf(work, "other-ca", "other-client", "client", "fdmig source", 3)
    make_leaf(work, "other-ca", "other-server", "server", "fdmig target", 4)
    w = lambda name: str(work / name)  # noqa: E731
    server = dict(server_cert=w("server-cert.pem"), server_key=w("server-key.pem"))
    client = dict(client_cert=w("client-cert.pem"), client_key=w("client-key.pem"))
    return types.SimpleNamespace(
        work=str(work),
        target=make_creds_dir(base / "target", ca_cert=w("ca-cert.pem"), **server),
        source=make_creds_dir(base / "source", ca_cert=w("ca-cert.pem"), **client),
        both=make_creds_dir(base / "both", ca_cert=w("ca-cert.pem"), **server, **client),
        foreign=make_creds_dir(base / "foreign", ca_cert=w("ca-cert.pem"),
                          client_cert=w("other-client-cert.pem"), client_key=w("other-client-key.pem")),
        ca_cert=w("ca-cert.pem"),
        client_cert=w("client-cert.pem"), client_key=w("client-key.pem"),
        other_client_cert=w("other-client-cert.pem"), other_client_key=w("other-client-key.pem"),
        other_server_cert=w("other-server-cert.pem"), other_server_key=w("other-server-key.pem"),
    )


# ----- helpers -----------------------------------------------------------------

def control_of(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, "web.sock")


def tcp_channel(port: int) -> str:
    return f"tcp:127.0.0.1:{port}"


def start_target(daemons, port: int, directory: str):
    """A migrate-in target of `web` waiting on the TCP channel at `port`."""
    return daemons("migrate-in", "--name", "web", "--channel", tcp_channel(port), "--tls-creds", directory,
                   ready=False)


def migrate_out(port: int, directory: str, *more: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return run("migrate-out", "--name", "web", "--channel", tcp_channel(port), "--tls-creds", directory,
               "--timeout", str(timeout), *more, timeout=timeout + 30)


def connect_tcp_when_listening(port: int, alive, timeout: float = 20.0) -> socket.socket:
    """Connect to a TCP port that a process we started listens on as it starts.
    There is no event for "now listening", so this retries, as
    helpers.connect_when_bound does for a unix path; `alive()` False stops it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline or not alive():
                raise
            time.sleep(0.005)


def foreign_hello() -> bytes:
    """A well-formed migration frame that any fdmig target answers with a frame of
    its own (an Abort: the name is not the target's), if it gets to read it: the
    foreign-CA test shows a target doing so for a signed certificate."""
    codec = wire.MigrationCodec(wire.Role.SOURCE)
    return b"".join(chunk.data for chunk in codec.send(wire.Hello("not-web", os.getpid(), "0")))


def what_the_target_sends_back(sock: socket.socket) -> bytes:
    """Every byte the target sends until it hangs up (a reset counts as hanging up);
    one that neither answers nor hangs up fails the test."""
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    except TimeoutError:
        raise AssertionError(f"the target neither refused nor answered the connection (got {received!r})") from None
    except (ssl.SSLError, ConnectionResetError):  # a TLS alert, or the target closed with our bytes unread
        return received


def refused_before_any_frame(raw: socket.socket, context: ssl.SSLContext | None) -> None:
    """Play a source that sends a migration frame, in plaintext (`context` None) or
    over TLS, and check that the target hangs up without one frame in return: it
    refused at the TLS layer, before reading any."""
    raw.settimeout(10)
    try:
        sock = raw if context is None else context.wrap_socket(raw)
    except (ssl.SSLError, ConnectionResetError):  # refused in the handshake itself (TLS 1.2)
        raw.close()
        return
    try:
        try:
            sock.sendall(foreign_hello())
        except (ssl.SSLError, BrokenPipeError, ConnectionResetError):
            return  # the target had already hung up
        answer = what_the_target_sends_back(sock)
    finally:
        sock.close()
    assert wire.MAGIC not in answer, f"the target answered with a migration frame: {answer!r}"
    if context is None:
        # In plaintext, at most a TLS alert record (content type 21) comes back.
        assert answer == b"" or answer[0] == 21, f"not a TLS alert: {answer!r}"
    else:
        assert answer == b"", f"application data after a refusal: {answer!r}"


def tls_client(ca_cert: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A TLS client that trusts the CA (and never checks the host name, as fdmig
    does not), presenting `cert` if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(ca_cert)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def logs_tls_refusal(target) -> bool:
    return any("refused" in line and "TLS" in line for line in target.stderr().splitlines())


def migrates_to(target, port: int, creds) -> None:
    """A valid source migrates to `target`, which takes the instance over."""
    result = migrate_out(port, creds.source)
    assert result.returncode == 0, result.stderr + target.stderr()[-2000:]
    target.wait_ready()


@pytest.fixture
def echo_source(daemons, short_dir):
    """The instance `web` (capability off) with an echo server chardev and a peer."""
    path = os.path.join(short_dir, "app.sock")
    source = daemons("serve", "--name", "web", "--chardev", ECHO.format(path=path))
    peer = connect_unix(path)
    assert echoes(peer, b"before")
    return source, peer


def still_serves(source, peer, runtime_dir) -> None:
    assert echoes(peer, b"still the source"), "the source stopped serving"
    state = status_of(control_of(runtime_dir))
    assert state["pid"] == source.pid and state["state"] == "running"
    assert source.proc.poll() is None


# ----- a migration over TLS --------------------------------------------------------

@pytest.mark.timeout(60)
def test_over_tls_every_chardev_is_opened_afresh_at_the_target_and_its_peers_reconnect(
        daemons, short_dir, runtime_dir, creds):
    app_path, up_path = os.path.join(short_dir, "app.sock"), os.path.join(short_dir, "up.sock")
    tcp_port, channel_port = free_port(), free_port()
    with listener(up_path) as upstream:
        source = daemons("serve", "--name", "web",
                         "--chardev", ECHO.format(path=app_path) + ",support-local-migration=on",
                         "--chardev", f"socket,id=tcp,host=127.0.0.1,port={tcp_port},server=on,frontend=echo",
                         "--chardev", f"socket,id=up,path={up_path},reconnect-ms=100")
        app_peer = connect_unix(app_path)
        tcp_peer = socket.create_connection(("127.0.0.1", tcp_port), timeout=10)
        assert echoes(app_peer, b"unix before") and echoes(tcp_peer, b"tcp before")
        from_source, _ = upstream.accept()
        assert paths.peercred(from_source)[0] == source.pid
        wait_states(control_of(runtime_dir), {"app": "connected", "tcp": "connected", "up": "connected"})

        target = start_target(daemons, channel_port, creds.target)
        # The mark says app's peer is to be kept: across hosts it is refused, the
        # source serving on, until --reconnect says a reconnect is wanted.
        refused = migrate_out(channel_port, creds.source)
        assert refused.returncode == 1 and "--reconnect" in refused.stderr, refused.stderr
        assert echoes(app_peer, b"unix still")
        result = migrate_out(channel_port, creds.source, "--reconnect")
        assert result.returncode == 0, result.stderr + target.stderr()[-2000:]
        assert "x-tcp-repair is off: 1 marked chardev(s) (app) will reconnect" in result.stderr
        target.wait_ready()
        assert source.proc.wait(10) == 0

        # The source closed every connection at the commit: its peers see EOF...
        from_source.settimeout(10)
        assert app_peer.recv(10) == b"" and tcp_peer.recv(10) == b"" and from_source.recv(10) == b""
        # ...and reconnect, to listeners the target created again at the same addresses.
        assert echoes(connect_unix(app_path), b"unix after")
        assert echoes(socket.create_connection(("127.0.0.1", tcp_port), timeout=10), b"tcp after")
        # The client chardev connects again, from the target.
        from_target, _ = upstream.accept()
        assert paths.peercred(from_target)[0] == target.pid
        wait_states(control_of(runtime_dir), {"up": "connected"})

    state = status_of(control_of(runtime_dir))
    assert state["pid"] == target.pid and state["state"] == "running"
    assert state["migration"]["status"] == "completed"
    assert state["capabilities"]["local-char-socket"] is False
    with qmp.connect(control_of(runtime_dir)) as client:
        assert client.execute("query-migrate")["status"] == "completed"


@pytest.mark.timeout(60)
def test_spawn_with_x_tcp_repair_is_refused_as_it_starts_the_target_on_this_host(daemons, short_dir, creds):
    path = os.path.join(short_dir, "app.sock")
    daemons("serve", "--name", "web", "--chardev", ECHO.format(path=path))
    peer = connect_unix(path)
    result = migrate_out(free_port(), creds.both, "--spawn", "--capability", "x-tcp-repair")
    assert result.returncode == 1
    assert "x-tcp-repair moves TCP connections to another host, but --spawn starts the target on this one" \
        in result.stderr
    assert echoes(peer)


@pytest.mark.timeout(60)
def test_spawn_over_tls_starts_a_target_on_the_tcp_channel_that_takes_over(
        daemons, short_dir, runtime_dir, creds, last_instance):
    path = os.path.join(short_dir, "app.sock")
    source = daemons("serve", "--name", "web", "--chardev", ECHO.format(path=path))
    peer = connect_unix(path)
    assert echoes(peer)
    result = migrate_out(free_port(), creds.both, "--spawn", "--json")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["status"] == "completed" and outcome["source-pid"] == source.pid
    assert source.proc.wait(10) == 0
    assert peer.recv(10) == b""
    assert echoes(connect_unix(path), b"to the spawned target")
    state = status_of(control_of(runtime_dir))
    assert state["pid"] == outcome["target-pid"] != source.pid and state["state"] == "running"


# ----- peers without a certificate from the CA ------------------------------------

@pytest.mark.timeout(60)
def test_a_source_whose_client_certificate_another_ca_signed_is_refused_before_any_frame(
        daemons, echo_source, runtime_dir, creds):
    source, peer = echo_source
    port = free_port()
    target = start_target(daemons, port, creds.target)
    alive = lambda: target.proc.poll() is None  # noqa: E731

    # Played by the test: the target hangs up on it without reading its Hello...
    refused_before_any_frame(connect_tcp_when_listening(port, alive),
                             tls_client(creds.ca_cert, creds.other_client_cert, creds.other_client_key))
    # ...which, from a certificate the CA signed, it reads and answers (and refuses: not its name).
    signed = tls_client(creds.ca_cert, creds.client_cert, creds.client_key)
    with signed.wrap_socket(connect_tcp_when_listening(port, alive)) as sock:
        codec = wire.MigrationCodec(wire.Role.SOURCE)
        send_chunks(sock, codec.send(wire.Hello("not-web", os.getpid(), "0")))
        reply = read_event(sock, codec)
    assert isinstance(reply, wire.Abort) and "foreign" in reply.reason, reply
    # A real source with that certificate: migrate-out fails naming TLS, the source serves on.
    result = migrate_out(port, creds.foreign)
    assert result.returncode == 1, result.stderr
    assert "TLS" in result.stderr, result.stderr
    still_serves(source, peer, runtime_dir)
    assert alive(), "the target stopped waiting"

    migrates_to(target, port, creds)  # a valid source, after
    assert logs_tls_refusal(target), target.stderr()
    assert status_of(control_of(runtime_dir))["pid"] == target.pid


def tls_client_without_a_certificate(creds) -> ssl.SSLContext:
    return tls_client(creds.ca_cert)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", [None, tls_client_without_a_certificate], ids=["plaintext", "tls-no-client-cert"])
def test_a_tcp_client_without_a_client_certificate_is_refused_and_the_target_keeps_waiting(
        daemons, echo_source, runtime_dir, creds, context):
    source, peer = echo_source
    port = free_port()
    target = start_target(daemons, port, creds.target)
    alive = lambda: target.proc.poll() is None  # noqa: E731
    refused_before_any_frame(connect_tcp_when_listening(port, alive),
                             None if context is None else context(creds))
    if context is None:  # an HTTP client too
        http = connect_tcp_when_listening(port, alive)
        http.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert wire.MAGIC not in what_the_target_sends_back(http)
        http.close()
    assert alive(), "the target stopped waiting"
    migrates_to(target, port, creds)
    assert logs_tls_refusal(target), target.stderr()
    state = status_of(control_of(runtime_dir))
    assert state["pid"] == target.pid and state["migration"]["status"] == "completed"


@pytest.mark.timeout(60)
def test_a_silent_tcp_client_does_not_keep_a_valid_source_out(daemons, echo_source, runtime_dir, creds):
    # A port scanner's connection that never says a word must not hold the channel.
    source, peer = echo_source
    port = free_port()
    target = start_target(daemons, port, creds.target)
    silent = connect_tcp_when_listening(port, lambda: target.proc.poll() is None)
    try:
        migrates_to(target, port, creds)
    finally:
        silent.close()
    assert status_of(control_of(runtime_dir))["pid"] == target.pid


@pytest.mark.timeout(60)
def test_the_source_refuses_a_target_whose_certificate_another_ca_signed(echo_source, runtime_dir, creds):
    source, peer = echo_source
    impostor = socket.create_server(("127.0.0.1", 0))
    impostor.settimeout(20)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(creds.other_server_cert, creds.other_server_key)
    context.verify_mode = ssl.CERT_NONE  # asks for no client certificate: any refusal is the source's
    got = {}

    def serve_one():
        try:
            conn, _ = impostor.accept()
        finally:
            impostor.close()  # one connection only: a source that tried again would find no one
        conn.settimeout(10)
        try:
            tls = context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, ConnectionResetError) as exc:
            got["refused"] = repr(exc)
            conn.close()
            return
        with tls:
            got["data"] = what_the_target_sends_back(tls)

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    result = migrate_out(impostor.getsockname()[1], creds.source, timeout=20)
    thread.join(20)
    assert not thread.is_alive()
    assert result.returncode == 1, result.stderr
    assert "TLS" in result.stderr, result.stderr
    assert not got.get("data"), f"the source sent migration data to an impostor: {got['data'][:64]!r}"
    still_serves(source, peer, runtime_dir)


# ----- local-char-socket cannot cross hosts ---------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["serve", "migrate-out"])
def test_local_char_socket_over_tcp_is_refused_naming_x_tcp_repair_and_the_source_serves_on(
        daemons, short_dir, runtime_dir, creds, where):
    path = os.path.join(short_dir, "app.sock")
    marked = ECHO.format(path=path) + ",support-local-migration=on"
    on_serve = ["--capability", "local-char-socket"] if where == "serve" else []
    source = daemons("serve", "--name", "web", *on_serve, "--chardev", marked)
    peer = connect_unix(path)
    assert echoes(peer)
    port = free_port()
    target = start_target(daemons, port, creds.target)
    on_migrate = ["--capability", "local-char-socket"] if where == "migrate-out" else []
    result = migrate_out(port, creds.source, *on_migrate, timeout=20)
    assert result.returncode == 1, result.stderr
    assert "local-char-socket" in result.stderr and "x-tcp-repair" in result.stderr, result.stderr
    still_serves(source, peer, runtime_dir)
    assert target.proc.poll() is None, "the target stopped waiting"


# ----- usage errors (exit 2) -------------------------------------------------------

@pytest.fixture
def web_source(daemons, short_dir):
    """An instance for migrate-out to be run against: a usage error must not depend on it."""
    return daemons("serve", "--name", "web", "--chardev", ECHO.format(path=os.path.join(short_dir, "app.sock")))


def migrate_in_args(*args: str) -> list[str]:
    # A bounded wait: a target that took the options would give up with 4, not hang.
    return ["migrate-in", "--name", "web", "--timeout", "5", *args]


def usage_error(args: list[str]) -> str:
    result = run(*args)
    assert result.returncode == 2, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    return result.stderr


@pytest.mark.parametrize("command", ["migrate-in", "migrate-out"])
def test_a_tcp_channel_without_tls_creds_is_a_usage_error(runtime_dir, web_source, command):
    channel = ["--channel", tcp_channel(free_port())]
    args = migrate_in_args(*channel) if command == "migrate-in" else ["migrate-out", "--name", "web", *channel]
    assert NO_TLS_CREDS in usage_error(args)
    assert web_source.proc.poll() is None


@pytest.mark.parametrize("command", ["migrate-in", "migrate-out"])
def test_tls_creds_in_a_directory_that_does_not_exist_is_a_usage_error_naming_it(
        runtime_dir, short_dir, web_source, command):
    missing = os.path.join(short_dir, "no-such-creds")
    tls = ["--channel", tcp_channel(free_port()), "--tls-creds", missing]
    args = migrate_in_args(*tls) if command == "migrate-in" else ["migrate-out", "--name", "web", *tls]
    assert missing in usage_error(args)


@pytest.mark.parametrize("command, missing", [("migrate-in", name) for name in TARGET_FILES]
                         + [("migrate-out", name) for name in SOURCE_FILES])
def test_tls_creds_without_a_file_the_end_needs_is_a_usage_error_naming_the_file(
        runtime_dir, short_dir, web_source, creds, command, missing):
    incomplete = os.path.join(short_dir, "creds")
    shutil.copytree(creds.target if command == "migrate-in" else creds.source, incomplete)
    os.unlink(os.path.join(incomplete, missing))
    tls = ["--channel", tcp_channel(free_port()), "--tls-creds", incomplete]
    args = migrate_in_args(*tls) if command == "migrate-in" else ["migrate-out", "--name", "web", *tls]
    assert missing in usage_error(args)


@pytest.mark.parametrize("channel", ["default", "unix"])
@pytest.mark.parametrize("command", ["migrate-in", "migrate-out"])
def test_tls_creds_with_a_unix_channel_is_a_usage_error(runtime_dir, short_dir, web_source, creds, command, channel):
    unix = [] if channel == "default" else ["--channel", f"unix:{short_dir}/chan.sock"]
    tls = [*unix, "--tls-creds", creds.both]
    args = migrate_in_args(*tls) if command == "migrate-in" else ["migrate-out", "--name", "web", *tls]
    assert "--tls-creds" in usage_error(args)
    assert web_source.proc.poll() is None
