"""QMP, the control protocol: the sans-IO codec without sockets, then a real instance
driven by QEMU's own client library (qemu.qmp) and by hostile raw-socket clients."""

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile

import pytest
from hypothesis import given, settings, strategies as st
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.models import Greeting

from fdmig import qmp
from fdmig.errors import FdmigError
from tests.helpers import Daemon, connect_unix, needs, recv_exactly

# ----- the codec, without sockets ----------------------------------------------------


def feed(data: bytes, chunks=None) -> list:
    codec = qmp.ServerCodec()
    if chunks is None:
        return codec.receive_data(data)
    out = []
    for piece in chunks:
        out += codec.receive_data(piece)
    return out


def test_requests_are_a_stream_of_json_values_without_newlines():
    items = feed(b'{"execute": "a"}{"execute": "b", "arguments": {"x": 1}}  \n{"execute":"c","id":3}')
    assert items == [qmp.Request("a", {}), qmp.Request("b", {"x": 1}), qmp.Request("c", {}, 3, True)]


def test_a_request_cut_at_every_byte_is_the_same_request():
    data = b'{"execute": "chardev-add", "arguments": {"id": "a{[\\"]}", "x": [1, {"y": "}"}]}, "id": "q"}'
    whole = feed(data)
    assert whole == [qmp.Request("chardev-add", {"id": 'a{["]}', "x": [1, {"y": "}"}]}, "q", True)]
    assert feed(data, [data[i:i + 1] for i in range(len(data))]) == whole


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
_requests = st.builds(lambda execute, arguments, ident: {"execute": execute, "arguments": arguments, "id": ident},
                      st.text(max_size=12), st.dictionaries(st.text(max_size=6), _json, max_size=4), _json)


@settings(max_examples=200, deadline=None)
@given(st.lists(_requests, min_size=1, max_size=5), st.lists(st.integers(0, 10_000), max_size=8),
       st.sampled_from(["", " ", "\n", "\r\n"]))
def test_stream_of_requests_split_anywhere_decodes_the_same(messages, cuts, separator):
    data = separator.join(json.dumps(m, separators=(",", ":")) for m in messages).encode()
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    expected = [qmp.Request(m["execute"], m["arguments"], m["id"], True) for m in messages]
    assert feed(data) == expected
    assert feed(data, chunks) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=20),
                          st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b" ", b"\n", b"1", b"true",
                                           b'{"execute": "x"}', b'{"id": 1}', b"\xff", b"\x00"])),
                max_size=40),
       st.lists(st.integers(0, 1000), max_size=6))
def test_arbitrary_bytes_never_raise_and_chunking_does_not_matter(pieces, cuts):
    data = b"".join(pieces)
    items = feed(data)
    assert all(isinstance(item, (qmp.Request, qmp.BadRequest, qmp.Overflow)) for item in items)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    assert feed(data, [data[a:b] for a, b in zip(bounds, bounds[1:])]) == items


def test_nesting_up_to_the_bound_is_accepted_and_deeper_overflows():
    depth = qmp.MAX_NESTING - 1  # plus the request object itself
    ok = b'{"execute": "x", "arguments": {"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}}"
    assert isinstance(feed(ok)[0], qmp.Request)
    deep = b"[" * (qmp.MAX_NESTING + 1)
    assert feed(deep) == [qmp.Overflow(f"JSON nesting deeper than {qmp.MAX_NESTING} levels")]
    assert feed(b"[" * 1000) == [qmp.Overflow(f"JSON nesting deeper than {qmp.MAX_NESTING} levels")]


def test_after_an_overflow_the_codec_takes_nothing_more():
    codec = qmp.ServerCodec()
    assert isinstance(codec.receive_data(b"[" * 100)[-1], qmp.Overflow)
    assert codec.receive_data(b']{"execute": "x"}') == []


@pytest.mark.parametrize("pieces", [1, 40], ids=["in-one-read", "in-many-reads"])
def test_a_message_over_the_size_bound_overflows_however_it_is_cut(pieces):
    # Regression: a complete oversized message that arrived in one read was accepted.
    data = b'{"execute": "x", "arguments": {"a": "' + b"a" * qmp.MAX_REQUEST + b'"}}'
    step = -(-len(data) // pieces)
    items = feed(data, [data[i:i + step] for i in range(0, len(data), step)])
    assert items == [qmp.Overflow(f"message longer than {qmp.MAX_REQUEST} bytes")]


def test_a_message_just_under_the_size_bound_is_accepted():
    head, tail = b'{"execute": "x", "arguments": {"a": "', b'"}}'
    data = head + b"a" * (qmp.MAX_REQUEST - len(head) - len(tail)) + tail
    assert feed(data) == [qmp.Request("x", {"a": "a" * (qmp.MAX_REQUEST - len(head) - len(tail))})]


def test_stray_tokens_get_an_error_and_the_next_request_still_runs():
    items = feed(b'42 {"execute": "a"} nonsense\n"str" true{"execute": "b"}')
    assert [type(i) for i in items] == [qmp.BadRequest, qmp.Request, qmp.BadRequest, qmp.BadRequest,
                                        qmp.BadRequest, qmp.Request]
    assert "stray token '42'" in items[0].desc
    assert "stray token 'nonsense'" in items[2].desc
    assert items[-1].execute == "b"


def test_a_byte_that_is_never_json_resets_the_stream_as_qemus_lexer_does():
    # Regression: '{' then garbage swallowed every later request (no reply, no close).
    items = feed(b'{"execute": \xff\xfe\x00 {"execute": "a", "id": 1}')
    assert [type(i) for i in items] == [qmp.BadRequest, qmp.Request]
    assert items[0].desc == "JSON parse error, invalid byte 0xff outside a string"
    assert feed(b'{"execute": "\xc3\xa9"}') == [qmp.Request("\u00e9", {})]  # inside a string it is UTF-8


@pytest.mark.parametrize("data, desc", [
    (b"[1, 2]", "QMP input must be a JSON object"),
    (b'{"execute": "x"', None),  # incomplete: waits for more
    (b'{"id": 7}', "QMP input lacks member 'execute'"),
    (b'{"execute": 5, "id": 7}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "x", "arguments": [], "id": 7}', "QMP input member 'arguments' must be an object"),
    (b'{"execute": "x", "colour": 1, "id": 7}', "QMP input member 'colour' is unexpected"),
    (b'{"exec-oob": "x", "id": 7}', "out-of-band was not enabled"),
    (b'{"execute": "x",, "id": 7}', "JSON parse error"),
    (b'{"execute": "\xff"}', "JSON parse error"),  # not UTF-8
])
def test_malformed_input_is_a_badrequest_that_names_the_problem(data, desc):
    items = feed(data)
    if desc is None:
        assert items == []
        return
    assert len(items) == 1 and isinstance(items[0], qmp.BadRequest)
    assert desc in items[0].desc
    reply = json.loads(qmp.ServerCodec.error(items[0], "GenericError", items[0].desc))
    assert reply["error"]["class"] == "GenericError"
    if b'"id": 7' in data and b",," not in data:
        assert reply["id"] == 7


@settings(max_examples=200, deadline=None)
@given(_json)
def test_the_id_is_echoed_whatever_its_json_type(ident):
    request, = feed(json.dumps({"execute": "query-status", "id": ident}).encode())
    assert json.loads(qmp.ServerCodec.reply(request, {}))["id"] == ident
    assert json.loads(qmp.ServerCodec.error(request, "GenericError", "no"))["id"] == ident
    bad, = feed(json.dumps({"id": ident}).encode())
    assert json.loads(qmp.ServerCodec.error(bad, "GenericError", bad.desc))["id"] == ident


def test_a_reply_without_an_id_has_none():
    request, = feed(b'{"execute": "x"}')
    assert json.loads(qmp.ServerCodec.reply(request, 1)) == {"return": 1}


def test_replies_and_events_are_one_json_object_per_line():
    request, = feed(b'{"execute": "x", "id": "a\\nb"}')
    for line in (qmp.ServerCodec.reply(request, {"s": "x\ny"}), qmp.ServerCodec.event("E", {"k": "\n"}),
                 qmp.ServerCodec.greeting("0.1.0")):
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert isinstance(json.loads(line), dict)
    event = json.loads(qmp.ServerCodec.event("MIGRATION", {"status": "setup"}))
    assert set(event) == {"event", "data", "timestamp"}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}


def test_greeting_is_what_qemu_qmp_expects():
    greeting = Greeting(json.loads(qmp.ServerCodec.greeting("1.2.3")))
    assert greeting.QMP.version["qemu"] == {"major": 1, "minor": 2, "micro": 3}
    assert greeting.QMP.capabilities == []


def test_commands_before_capabilities_negotiation_are_commandnotfound():
    codec = qmp.ServerCodec()
    status, caps, again = codec.receive_data(
        b'{"execute": "query-status"}{"execute": "qmp_capabilities"}{"execute": "qmp_capabilities"}')
    assert codec.gate(status)[0] == "CommandNotFound"
    assert codec.gate(caps) is None and codec.negotiated
    assert codec.gate(again)[0] == "CommandNotFound"
    assert codec.gate(status) is None


def test_client_and_server_codecs_talk_to_each_other():
    client, server = qmp.ClientCodec(), qmp.ServerCodec()
    ident, data = client.request("chardev-remove", {"id": "app"})
    request, = server.receive_data(data)
    assert (request.execute, request.arguments, request.id) == ("chardev-remove", {"id": "app"}, ident)
    reply = server.reply(request, {}) + server.event("X", {"a": 1})
    assert client.receive_data(reply[:5]) == []
    assert client.receive_data(reply[5:]) == [{"return": {}, "id": ident},
                                              {"event": "X", "data": {"a": 1}, "timestamp": json.loads(
                                                  reply.splitlines()[1])["timestamp"]}]


def test_client_codec_refuses_a_non_json_or_endless_reply():
    with pytest.raises(FdmigError, match="not JSON"):
        qmp.ClientCodec().receive_data(b"{nope\n")
    with pytest.raises(FdmigError, match="longer than 100 bytes"):
        qmp.ClientCodec(max_line=100).receive_data(b"x" * 101)


# ----- a real instance ----------------------------------------------------------------


@pytest.fixture(scope="module")
def instance():
    """One instance for the module, an echo server `app` on it. Every test leaves it
    serving; the hostile tests then prove it still echoes."""
    directory = tempfile.mkdtemp(prefix="fdq-", dir="/tmp")
    os.chmod(directory, 0o700)
    env = dict(os.environ, FDMIG_RUNTIME_DIR=os.path.join(directory, "rt"))
    env.pop("NOTIFY_SOCKET", None)
    app = os.path.join(directory, "app.sock")
    daemon = Daemon(["serve", "--chardev", f"socket,id=app,path={app},server=on,frontend=echo"],
                    directory, env=env)
    daemon.dir = directory
    daemon.control = os.path.join(directory, "rt", "default.sock")
    daemon.app = app
    yield daemon
    daemon.close()
    shutil.rmtree(directory, ignore_errors=True)


def assert_echoes(instance, payload=b"still here"):
    assert instance.proc.poll() is None, "the instance died"
    with connect_unix(instance.app, timeout=5) as peer:
        peer.sendall(payload)
        assert recv_exactly(peer, len(payload)) == payload


@contextlib.asynccontextmanager
async def qmp_client(instance, negotiate=True):
    client = QMPClient("test")
    client.negotiate = negotiate
    await client.connect(instance.control)
    try:
        yield client
    finally:
        await client.disconnect()


def arun(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 15))


async def next_state(listener, label):
    while True:
        event = await listener.get()
        if event["data"]["label"] == label:
            return event["data"]["state"]


def socket_args(label, path, **data):
    return {"id": label, "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": path}}, **data}}}


def test_qemu_qmp_client_negotiates_and_queries_status(instance):
    async def main():
        async with qmp_client(instance) as client:
            assert client.greeting.QMP.version["package"].startswith("fdmig")
            assert await client.execute("query-status") == {"status": "running", "running": True,
                                                            "singlestep": False}
            status = await client.execute("x-fdmig-status")
            assert status["pid"] == instance.pid and status["state"] == "running"
            assert [c["label"] for c in status["chardevs"]] == ["app"]
    arun(main())


def test_query_chardev_uses_qemus_filename_forms_and_events_follow_the_peer(instance):
    async def main():
        async with qmp_client(instance) as client:
            listening = {"label": "app", "filename": f"disconnected:unix:{instance.app},server=on",
                         "frontend-open": False}
            assert await client.execute("query-chardev") == [listening]
            with client.listener("X_FDMIG_CHARDEV_STATE") as listener:
                peer = connect_unix(instance.app)
                assert await next_state(listener, "app") == "connected"
                assert await client.execute("query-chardev") == [
                    {"label": "app", "filename": f"unix:{instance.app},server=on", "frontend-open": True}]
                peer.close()
                assert await next_state(listener, "app") == "listening"
            assert await client.execute("query-chardev") == [listening]
    arun(main())


def test_chardev_add_with_qemus_shape_then_remove(instance):
    path = os.path.join(instance.dir, "added.sock")

    async def main():
        async with qmp_client(instance) as client:
            assert await client.execute("chardev-add", socket_args(
                "added", path, server=True, frontend="echo", **{"support-local-migration": True})) == {}
            with client.listener("X_FDMIG_CHARDEV_STATE") as listener:
                peer = connect_unix(path)
                assert await next_state(listener, "added") == "connected"
            peer.sendall(b"ping")
            assert recv_exactly(peer, 4) == b"ping"
            chardevs = {c["label"]: c for c in (await client.execute("x-fdmig-status"))["chardevs"]}
            assert chardevs["added"]["support-local-migration"] is True
            assert await client.execute("chardev-remove", {"id": "added"}) == {}
            assert peer.recv(1) == b""
            peer.close()
            assert not os.path.exists(path)
            assert [c["label"] for c in await client.execute("query-chardev")] == ["app"]
    arun(main())


def test_chardev_add_of_a_client_with_qemus_inet_shape(instance):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        port = server.getsockname()[1]

        async def main():
            async with qmp_client(instance) as client:
                await client.execute("chardev-add", {"id": "tcp", "backend": {"type": "socket", "data": {
                    "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}},
                    "server": False, "reconnect-ms": 0}}})
                conn, _ = server.accept()
                await client.execute("chardev-remove", {"id": "tcp"})
                conn.settimeout(10)
                assert conn.recv(1) == b""
                conn.close()
        arun(main())


def test_getfd_then_chardev_add_on_the_named_fd(instance):
    ours, theirs = socket.socketpair()
    ours.settimeout(10)

    async def main():
        async with qmp_client(instance) as client:
            client.send_fd_scm(theirs.fileno())
            assert await client.execute("getfd", {"fdname": "pair"}) == {}
            theirs.close()
            await client.execute("chardev-add", {"id": "passed", "backend": {"type": "socket", "data": {
                "addr": {"type": "fd", "data": {"str": "pair"}}, "frontend": "echo"}}})
            ours.sendall(b"over the passed fd")
            assert recv_exactly(ours, 18) == b"over the passed fd"
            status = {c["label"]: c for c in (await client.execute("x-fdmig-status"))["chardevs"]}
            assert status["passed"]["state"] == "connected"
            assert status["passed"]["address"] == "fd:pair"
            await client.execute("chardev-remove", {"id": "passed"})
            assert ours.recv(1) == b""
    try:
        arun(main())
    finally:
        ours.close()


def test_closefd_closes_the_instances_copy(instance):
    ours, theirs = socket.socketpair()
    ours.settimeout(10)

    async def main():
        async with qmp_client(instance) as client:
            client.send_fd_scm(theirs.fileno())
            await client.execute("getfd", {"fdname": "spare"})
            theirs.close()
            assert await client.execute("closefd", {"fdname": "spare"}) == {}
            assert ours.recv(1) == b""  # the instance held the last copy
            with pytest.raises(ExecuteError) as error:
                await client.execute("closefd", {"fdname": "spare"})
            assert error.value.error_class == "GenericError"
            with pytest.raises(ExecuteError, match="No file descriptor supplied"):
                await client.execute("getfd", {"fdname": "nothing"})
            with pytest.raises(ExecuteError, match="not found"):
                await client.execute("chardev-add", {"id": "nofd", "backend": {"type": "socket", "data": {
                    "addr": {"type": "fd", "data": {"str": "nothing"}}}}})
    try:
        arun(main())
    finally:
        ours.close()


def test_before_qmp_capabilities_every_command_is_commandnotfound(instance):
    async def main():
        async with qmp_client(instance, negotiate=False) as client:
            with pytest.raises(ExecuteError) as error:
                await client.execute("query-status")
            assert error.value.error_class == "CommandNotFound"
            assert await client.execute("qmp_capabilities") == {}
            assert (await client.execute("query-status"))["running"] is True
            with pytest.raises(ExecuteError) as error:
                await client.execute("qmp_capabilities")
            assert error.value.error_class == "CommandNotFound"
    arun(main())


@pytest.mark.parametrize("command, arguments, error_class, desc", [
    ("no-such-command", None, "CommandNotFound", "The command no-such-command has not been found"),
    ("chardev-remove", {}, "GenericError", "Parameter 'id' is missing"),
    ("chardev-remove", {"id": 5}, "GenericError", "Invalid parameter type for 'id', expected: string"),
    ("chardev-remove", {"id": "app", "force": True}, "GenericError", "Parameter 'force' is unexpected"),
    ("chardev-remove", {"id": "nope"}, "GenericError", "Chardev 'nope' not found"),
    ("chardev-add", {"id": "x"}, "GenericError", "Parameter 'backend' is missing"),
    ("chardev-add", {"id": "x", "backend": "socket"}, "GenericError", "Invalid parameter type for 'backend'"),
    ("chardev-add", socket_args("app", "/tmp/fdmig-dup"), "GenericError", "duplicate label 'app'"),
    ("chardev-add", socket_args("x", "/tmp/p", server=True, **{"reconnect-ms": 5}), "GenericError",
     "reconnect-ms: only a client reconnects"),
    ("chardev-add", socket_args("x", "/tmp/p", **{"local-incoming": True}), "GenericError",
     "only an incoming instance"),
    ("getfd", {"fdname": 1}, "GenericError", "Invalid parameter type for 'fdname'"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "nope", "state": True}]}, "GenericError",
     "does not accept value 'nope'"),
    ("migrate-set-capabilities", {"capabilities": "all"}, "GenericError", "expected: array"),
    ("query-status", {"verbose": True}, "GenericError", "Parameter 'verbose' is unexpected"),
    ("migrate-set-parameters", {"local": "yes"}, "GenericError", "Invalid parameter type for 'local', expected: "
                                                                 "boolean"),
    ("migrate-set-parameters", {"local": 1}, "GenericError", "Invalid parameter type for 'local', expected: boolean"),
    ("migrate-set-parameters", {"local": None}, "GenericError", "Invalid parameter type for 'local'"),
    ("migrate-set-parameters", {"downtime-limit": 300}, "GenericError", "Parameter 'downtime-limit' is unexpected"),
    ("query-migrate-parameters", {"local": True}, "GenericError", "Parameter 'local' is unexpected"),
])
def test_bad_commands_get_qemus_error_classes(instance, command, arguments, error_class, desc):
    async def main():
        async with qmp_client(instance) as client:
            with pytest.raises(ExecuteError) as error:
                await client.execute(command, arguments)
            assert error.value.error_class == error_class
            assert desc in str(error.value)
            assert (await client.execute("query-status"))["running"] is True
    arun(main())
    assert_echoes(instance)


def test_capabilities_can_be_set_and_queried(instance):
    async def main():
        async with qmp_client(instance) as client:
            caps = [{"capability": "local-char-socket", "state": True}, {"capability": "x-tcp-repair", "state": True}]
            assert await client.execute("migrate-set-capabilities", {"capabilities": caps}) == {}
            assert await client.execute("query-migrate-capabilities") == caps
            caps[0]["state"] = False
            await client.execute("migrate-set-capabilities", {"capabilities": caps[:1]})
            assert await client.execute("query-migrate-capabilities") == [caps[0], caps[1]]
    arun(main())


def test_migrate_set_parameters_local_is_the_local_char_socket_capability(instance):
    # QEMU's newer switch for local migration, beside the capability: one switch.
    def local_char_socket(caps):
        return next(c["state"] for c in caps if c["capability"] == "local-char-socket")

    async def main():
        async with qmp_client(instance) as client:
            try:
                assert await client.execute("migrate-set-parameters", {"local": True}) == {}
                assert await client.execute("query-migrate-parameters") == {"local": True}
                assert local_char_socket(await client.execute("query-migrate-capabilities")) is True
                assert (await client.execute("x-fdmig-status"))["capabilities"]["local-char-socket"] is True
                assert await client.execute("migrate-set-parameters", {"local": False}) == {}
                assert await client.execute("query-migrate-parameters") == {"local": False}
                assert local_char_socket(await client.execute("query-migrate-capabilities")) is False
                assert await client.execute("migrate-set-parameters", {}) == {}  # nothing to set: QEMU's no-op
                assert (await client.execute("query-migrate-parameters"))["local"] is False
                await client.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "local-char-socket", "state": True}]})
                assert await client.execute("query-migrate-parameters") == {"local": True}
            finally:
                await client.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "local-char-socket", "state": False}]})
    arun(main())


def test_migrate_set_parameters_from_the_cli_client_turns_the_capability_on(instance):
    with qmp.connect(instance.control) as client:
        try:
            client.execute("migrate-set-parameters", {"local": True})
            assert client.execute("x-fdmig-status")["capabilities"]["local-char-socket"] is True
        finally:
            client.execute("migrate-set-parameters", {"local": False})
        assert client.execute("query-migrate-parameters") == {"local": False}


# ----- a client that half-closes --------------------------------------------------------


def half_closed_exchange(path, data: bytes) -> list[dict]:
    """Send `data`, shut down our side, and read every line until the instance
    closes the connection."""
    with connect_unix(path, timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


def test_every_request_sent_before_a_half_close_is_answered_in_order_then_the_connection_closes(instance):
    # Issue 21: after the client's shutdown(SHUT_WR) the instance closed at once,
    # and only the first request (if any) was answered.
    requests = [{"execute": "qmp_capabilities", "id": "caps"},
                {"execute": "query-status", "id": 1},
                {"execute": "no-such-command", "id": 2},
                {"execute": "query-chardev", "id": 3},
                {"execute": "x-fdmig-status", "id": 4},
                {"execute": "query-migrate-parameters", "id": 5}]
    replies = half_closed_exchange(instance.control, b"".join(json.dumps(r).encode() for r in requests))
    assert "QMP" in replies[0]
    replies = [r for r in replies[1:] if "event" not in r]
    assert [r["id"] for r in replies] == ["caps", 1, 2, 3, 4, 5]
    assert replies[1]["return"]["running"] is True
    assert replies[2]["error"]["class"] == "CommandNotFound"
    assert replies[3]["return"][0]["label"] == "app"
    assert replies[4]["return"]["pid"] == instance.pid
    assert replies[5]["return"] == {"local": False}
    assert_echoes(instance)


def test_more_requests_than_the_instance_queues_before_a_half_close_are_all_answered(instance):
    # More than MAX_QUEUED_REQUESTS: the instance stops reading until it has
    # answered some, and reads the half-close only after them.
    data = b'{"execute": "qmp_capabilities"}' + b"".join(
        json.dumps({"execute": "query-status", "id": i}).encode() for i in range(300))
    replies = [r for r in half_closed_exchange(instance.control, data)[2:] if "event" not in r]
    assert [r["id"] for r in replies] == list(range(300))


def test_a_half_close_right_after_the_greeting_closes_the_connection(instance):
    assert ["QMP" in r for r in half_closed_exchange(instance.control, b"")] == [True]
    assert_echoes(instance)


@needs("socat")
def test_printf_into_socat_gets_every_reply(instance):
    commands = "\n".join(['{"execute":"qmp_capabilities"}', '{"execute":"query-status"}',
                          '{"execute":"query-migrate-parameters"}']) + "\n"
    result = subprocess.run(["socat", "-", f"UNIX-CONNECT:{instance.control}"], input=commands,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert "QMP" in replies[0]
    assert [r for r in replies[1:] if "event" not in r] == [
        {"return": {}}, {"return": {"status": "running", "running": True, "singlestep": False}},
        {"return": {"local": False}}]


# ----- hostile raw-socket clients ---------------------------------------------------------


class Raw:
    """A control client that speaks bytes, not QMP."""

    def __init__(self, path):
        self.sock = connect_unix(path, timeout=10)
        self.buf = b""
        self.greeting = self.message()

    def message(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def messages_until_eof(self):
        out = []
        try:
            while True:
                out.append(self.message())
        except (EOFError, ConnectionResetError):
            return out

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server has hung up on us: that is an answer too

    def execute(self, execute, **extra):
        self.send(json.dumps({"execute": execute, **extra}).encode())
        return self.message()

    def close(self):
        self.sock.close()


@pytest.fixture
def raw(instance):
    client = Raw(instance.control)
    assert "QMP" in client.greeting
    yield client
    client.close()
    assert_echoes(instance)


def test_garbage_bytes_get_errors_and_the_connection_stays_usable(raw):
    raw.send(b"\x00\xff\xfe garbage \x01 }{\xff\n")
    raw.send(b'{"execute": "qmp_capabilities", "id": "after"}')
    replies = []
    while not replies or replies[-1].get("id") != "after":
        replies.append(raw.message())
    assert len(replies) > 1
    assert all(r["error"]["class"] == "GenericError" for r in replies[:-1])
    assert replies[-1]["return"] == {}


def test_a_2mib_line_gets_an_error_and_a_closed_connection(raw):
    raw.send(b'{"execute": "qmp_capabilities", "arguments": {"x": "' + b"x" * (2 << 20) + b'"}}\n')
    replies = raw.messages_until_eof()
    assert replies, "expected an error reply before the close"
    assert "longer than" in replies[0]["error"]["desc"]


def test_1000_deep_nesting_gets_an_error_and_a_closed_connection(raw):
    raw.send(b"[" * 1000 + b"]" * 1000)
    replies = raw.messages_until_eof()
    assert [r["error"]["desc"] for r in replies] == [f"JSON nesting deeper than {qmp.MAX_NESTING} levels"]


def test_wrong_types_get_errors_and_the_connection_stays_usable(raw):
    assert raw.execute(5, id="a") == {"error": {"class": "GenericError",
                                                "desc": "QMP input member 'execute' must be a string"}, "id": "a"}
    assert raw.execute("qmp_capabilities", arguments=[], id=[1])["id"] == [1]
    assert raw.execute("qmp_capabilities", id={"k": None}) == {"return": {}, "id": {"k": None}}
    assert "error" in raw.execute("chardev-add", arguments={"id": ["app"], "backend": 7}, id=2)
    assert "error" in raw.execute("chardev-remove", arguments={"id": None}, id=3)
    assert "error" in raw.execute("getfd", arguments={"fdname": {}}, id=4)
    assert "error" in raw.execute("x-fdmig-status", arguments={"a": 1}, id=5)
    assert raw.execute("query-status", id=6)["return"]["running"] is True


def test_a_flood_of_requests_is_answered_in_order(raw):
    raw.execute("qmp_capabilities")
    raw.send(b"".join(json.dumps({"execute": "query-status", "id": i}).encode() for i in range(500)))
    assert [raw.message()["id"] for _ in range(500)] == list(range(500))


def test_fds_sent_without_getfd_are_not_kept(raw, instance):
    raw.execute("qmp_capabilities")
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    raw.sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, theirs.fileno().to_bytes(4, "little"))])
    theirs.close()
    assert "return" in raw.execute("query-status")
    assert ours.recv(1) == b""  # the instance closed the fd nobody named
    ours.close()


def test_more_fds_than_the_instance_takes_are_all_closed(raw):
    raw.execute("qmp_capabilities")
    pairs = [socket.socketpair() for _ in range(40)]
    theirs = [b.fileno() for _, b in pairs]
    raw.sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(
        fd.to_bytes(4, "little") for fd in theirs))])
    for _, b in pairs:
        b.close()
    raw.send(b'{"execute": "query-status"}')
    replies = raw.messages_until_eof()  # dropped as a client that broke the protocol
    assert all("return" not in r for r in replies)
    for ours, _ in pairs:
        ours.settimeout(10)
        assert ours.recv(1) == b""
        ours.close()


def test_a_client_that_hangs_up_mid_message_does_no_harm(instance):
    for fragment in (b'{"execute": "qmp_capab', b"[[[[", b'"unterminated'):
        raw = Raw(instance.control)
        raw.send(fragment)
        raw.close()
    assert_echoes(instance)


def _many_chardevs(n: int, tmp: str):
    """An instance (not serving) with n registered client chardevs, c1 made to
    look live (quotes and all), and b bridged to c0."""
    from fdmig import daemon, spec as specs
    from fdmig.poller import Poller
    instance = daemon.Instance("many", f"{tmp}/many.sock")
    instance.poller = Poller(asyncio.get_running_loop())
    for i in range(n):
        instance.register(specs.parse_spec(f"socket,id=c{i},path=/nonexistent/c{i}.sock"))
    instance.register(specs.parse_spec("socket,id=b,path=/nonexistent/b.sock,server=on,bridge=c0"))
    live = instance.chardevs["c1"]
    live.peer, live.connected_since, live.rx_bytes, live.migrations = ("unix:", 42, 'a "b"'), 1e9, 7, 2
    return instance


def _expected_row(chardev):
    """status_row() and the live fields, written out."""
    from fdmig import presentation
    peer, pid, process = chardev.peer or (None, None, None)
    frontend = f"bridge={chardev.frontend.partner.label}" if chardev.frontend.name == "bridge" \
        else chardev.frontend.name
    row = presentation.status_row(chardev.spec, chardev.state.value, frontend)
    row.update({"fd": chardev.fd, "peer": peer, "peer-pid": pid, "peer-process": process,
                "rx-bytes": chardev.rx_bytes, "tx-bytes": chardev.tx_bytes,
                "connected-since": presentation.utc_iso(chardev.connected_since)
                if chardev.connected_since else None, "migrations": chardev.migrations})
    return row


def test_a_status_of_thousands_is_made_in_slices_each_sent_as_made_with_the_loop_serving_between(tmp_path):
    """x-fdmig-status of many chardevs: its rows are made and go out a slice at a
    time, so that their peers are served in between (issue 13: three status calls
    of 3000 chardevs had made streaming peers wait 48 ms; then building the whole
    reply in one turn, 5 ms at 5000)."""
    from fdmig import daemon, qmp as qmpcodec

    n = daemon.STATUS_SLICE * 3 + 5

    async def main():
        instance = _many_chardevs(n, str(tmp_path))
        turns = 0

        async def serving():
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1
        server = asyncio.ensure_future(serving())
        await asyncio.sleep(0)
        status = await instance.status()
        head, streamed, tail = qmpcodec.ServerCodec.reply_parts(qmpcodec.Request("x-fdmig-status", {}, 7, True),
                                                                 status)
        pieces, turns_before = [], []
        async for piece in streamed.pieces:
            pieces.append(piece)
            turns_before.append(turns)
        server.cancel()
        return head, pieces, tail, turns_before, [_expected_row(c) for c in instance.chardevs.values()]

    head, pieces, tail, turns_before, rows = asyncio.run(main())
    slices = [p for p in pieces if p not in ("[", "]")]
    assert len(slices) == 4  # n + 1 rows, STATUS_SLICE a slice
    # A turn of the loop between each two slices.
    assert all(later > earlier for earlier, later in zip(turns_before[1:-1], turns_before[2:-1]))
    reply = json.loads(head + "".join(pieces).encode() + tail)
    assert tail.endswith(b"}\n") and b"\n" not in head
    assert reply["id"] == 7
    assert reply["return"]["chardevs"] == rows  # each row: status_row() with its live fields
    assert [list(row) for row in reply["return"]["chardevs"]] == [list(row) for row in rows]  # keys in order
    assert len(rows) == n + 1


def test_a_status_of_thousands_is_paced_to_a_quarter_of_a_cpu(tmp_path):
    """Between two slices the loop serves, or sleeps, three times as long as the
    slice took (STATUS_PACE): unpaced, a status and the client reading it kept
    both CPUs of a 2-CPU host busy, and streaming peers waited for a CPU. The
    share can only come out smaller on a busy machine: sleeps never end early."""
    import time
    from fdmig import daemon, qmp as qmpcodec

    async def main():
        instance = _many_chardevs(daemon.STATUS_SLICE * 20, str(tmp_path))
        status = await instance.status()
        _, streamed, _ = qmpcodec.ServerCodec.reply_parts(qmpcodec.Request("x-fdmig-status", {}, 1, True), status)
        cpu, wall = time.thread_time(), time.monotonic()
        async for _ in streamed.pieces:
            pass
        return (time.thread_time() - cpu) / (time.monotonic() - wall)

    assert asyncio.run(main()) < 0.4


def test_a_status_row_shows_what_changed_since_the_last_and_a_bridge_partner_that_went(tmp_path):
    """Rows keep their JSON between two calls; what changed must still show: the
    byte counts, a new peer, a state, a migration, and the frontend of a chardev
    whose bridge partner was removed."""
    from fdmig import chardev as chardevs, presentation

    async def main():
        instance = _many_chardevs(2, str(tmp_path))
        c0, c1, b = (instance.chardevs[label] for label in ("c0", "c1", "b"))
        first = [json.loads(presentation.row_json(c)) for c in (c0, c1, b)]
        c1.rx_bytes, c1.tx_bytes = 1000, 2000
        c1.peer, c1.connected_since, c1.migrations = ("unix:/p", 7, "socat"), 2e9, 3
        c1.state = chardevs.State.CONNECTED
        instance._unwire(b)
        del instance.chardevs["b"]
        return first, [json.loads(presentation.row_json(c)) for c in (c0, c1)], [_expected_row(c) for c in (c0, c1)]

    first, later, expected = asyncio.run(main())
    assert first[0]["frontend"] == "bridge=b" and first[1]["rx-bytes"] == 7
    assert later == expected
    assert later[0]["frontend"] == "hold"
    assert (later[1]["state"], later[1]["rx-bytes"], later[1]["tx-bytes"], later[1]["peer-pid"],
            later[1]["migrations"]) == ("connected", 1000, 2000, 7, 3)


def test_a_targets_staged_rows_are_framed_after_the_takeover_and_a_status_before_that_is_whole(tmp_path):
    """A migration's target stages thousands of chardevs while the source's peers
    want the CPU: their rows' JSON is not framed then (register frame=False), but
    by frame_rows (paced) after the takeover. A status in between frames what it
    shows itself, bridge partners too."""
    from fdmig import daemon, presentation, spec as specs
    from fdmig.poller import Poller

    async def main():
        instance = daemon.Instance("staged", f"{tmp_path}/staged.sock")
        instance.poller = Poller(asyncio.get_running_loop())
        count = daemon.STATUS_SLICE + 3
        for i in range(count):
            instance.register(specs.parse_spec(f"socket,id=c{i},path=/nonexistent/c{i}.sock"), frame=False)
        instance.register(specs.parse_spec("socket,id=b,path=/nonexistent/b.sock,server=on,bridge=c0"),
                          frame=False)
        unframed = sum(c.row_frame is None for c in instance.chardevs.values())
        early = json.loads(presentation.row_json(instance.chardevs["c0"]))
        await instance.frame_rows()
        framed = all(c.row_frame is not None for c in instance.chardevs.values())
        return unframed, early, framed, [(json.loads(presentation.row_json(c)), _expected_row(c))
                                         for c in instance.chardevs.values()]

    unframed, early, framed, rows = asyncio.run(main())
    assert unframed == daemon.STATUS_SLICE + 4 and framed
    assert early["frontend"] == "bridge=b"
    assert all(got == expected for got, expected in rows)


def test_an_event_during_a_streamed_reply_comes_after_it_never_inside_its_line(tmp_path):
    """A QMP reply is one line: a MIGRATION event broadcast while a status of
    thousands is going out waits for the end of it."""
    from fdmig import control, daemon

    async def main():
        instance = _many_chardevs(daemon.STATUS_SLICE * 4, str(tmp_path))
        instance.control = server = control.ControlServer(instance)
        server.bind(f"{tmp_path}/many.sock")
        server.start()
        reader, writer = await asyncio.open_unix_connection(f"{tmp_path}/many.sock", limit=64 << 20)
        await reader.readline()  # greeting
        writer.write(b'{"execute": "qmp_capabilities"}\n{"execute": "x-fdmig-status", "id": 1}\n')
        assert json.loads(await reader.readline()) == {"return": {}}
        start = await reader.readexactly(1)
        assert start == b"{"
        [connection] = server.connections
        assert connection._held is not None  # the reply has begun going out, and is not whole yet
        instance.emit("MIGRATION", {"status": "setup"})
        lines = [start + await reader.readline(), await reader.readline()]
        writer.close()
        server.close()
        return [json.loads(line) for line in lines]

    reply, event = asyncio.run(main())
    assert reply["id"] == 1 and len(reply["return"]["chardevs"]) == daemon.STATUS_SLICE * 4 + 1
    assert event["event"] == "MIGRATION" and event["data"] == {"status": "setup"}


def test_a_streamed_value_goes_in_where_it_stands_whatever_the_other_strings_hold():
    """A peer's words in a reply (an error a target sent) may hold anything, the
    stand-in for a streamed value included: they stay as they were."""
    from fdmig import qmp as qmpcodec
    words = "\0streamed 0\0"
    head, streamed, tail = qmpcodec.encode_parts({"error": words, "chardevs": qmpcodec.Streamed(None), "after": words})
    assert json.loads(head + b'[{"label": "a"}]' + tail) == {"error": words, "chardevs": [{"label": "a"}], "after": words}
    assert qmpcodec.encode_parts({"a": 1}) == (b'{"a": 1}\n', None, b"")


