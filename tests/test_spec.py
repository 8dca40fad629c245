"""SPEC parsing (QEMU's `-chardev socket,...` syntax and QEMU's chardev-add shape),
without processes; then the CLI's exit 2 for every kind of mistake, and a running
instance holding the rule that no two chardevs share an address."""

import os

import pytest
from hypothesis import example, given, settings, strategies as st

from fdmig import qmp
from fdmig.errors import FdmigError, SpecError
from fdmig.spec import (UNIX_PATH_MAX, ChardevSpec, Held, check_fits, check_set, from_dict, from_qmp, parse_spec)
from tests.helpers import calls, connect_unix, echoes, free_port, listener, run, run_many, status_of

# Also run against the lowest click, rich and psutil pyproject admits (.ci/floor.txt).
pytestmark = pytest.mark.cli

# ----- every key -------------------------------------------------------------


def test_unix_client_is_the_default_role():
    spec = parse_spec("socket,id=app,path=/run/app.sock")
    assert spec == ChardevSpec(id="app", kind="unix", path="/run/app.sock")
    assert spec.role == "client"
    assert spec.address == "unix:/run/app.sock"
    assert (spec.server, spec.wait, spec.reconnect_ms, spec.frontend) == (False, False, 0, "hold")


def test_every_key_of_a_server_is_parsed():
    spec = parse_spec("socket,id=web.1_a-b,path=/run/x.sock,server=on,wait=on,nodelay=on,"
                      "support-local-migration=on,frontend=echo,logfile=/tmp/log,logappend=on")
    assert spec == ChardevSpec(id="web.1_a-b", kind="unix", path="/run/x.sock", server=True, wait=True,
                               nodelay=True, support_local_migration=True, frontend="echo",
                               logfile="/tmp/log", logappend=True)
    assert spec.role == "server"


def test_every_key_of_a_tcp_client_is_parsed():
    spec = parse_spec("socket,id=up,host=example.org,port=8080,reconnect-ms=500,local-incoming=yes,"
                      "frontend=sink")
    assert (spec.kind, spec.host, spec.port, spec.reconnect_ms, spec.local_incoming, spec.frontend) == \
        ("inet", "example.org", 8080, 500, True, "sink")
    assert spec.address == "tcp:example.org:8080"


def test_ipv6_host_is_written_with_or_without_brackets():
    bare = parse_spec("id=a,host=::1,port=1")
    bracketed = parse_spec("id=a,host=[::1],port=1")
    assert bare == bracketed
    assert bare.host == "::1"
    assert bare.address == "tcp:[::1]:1"


def test_server_may_listen_on_port_zero_but_a_client_may_not_connect_to_it():
    assert parse_spec("id=a,host=127.0.0.1,port=0,server=on").port == 0
    with pytest.raises(SpecError, match="port.*accepted: 1 to 65535"):
        parse_spec("id=a,host=127.0.0.1,port=0")


def test_fd_takes_a_number_or_a_getfd_name():
    assert parse_spec("id=a,fd=7").fd == "7"
    assert parse_spec("id=a,fd=mysock").fd == "mysock"
    assert parse_spec("id=a,fd=7").address == "fd:7"
    with pytest.raises(SpecError, match="chardev a: fd:"):
        parse_spec("id=a,fd=-1")


def test_fdname_names_a_socket_activation_fd():
    spec = parse_spec("id=a,fdname=web.socket,server=on")
    assert (spec.kind, spec.fdname, spec.address) == ("fdname", "web.socket", "fdname:web.socket")


def test_bridge_implies_the_bridge_frontend():
    assert parse_spec("id=a,path=/p,bridge=b").frontend == "bridge"
    assert parse_spec("id=a,path=/p,bridge=b,frontend=bridge").bridge == "b"
    with pytest.raises(SpecError, match="bridge.*frontend=echo"):
        parse_spec("id=a,path=/p,bridge=b,frontend=echo")
    with pytest.raises(SpecError, match="frontend=bridge needs bridge=LABEL"):
        parse_spec("id=a,path=/p,frontend=bridge")
    with pytest.raises(SpecError, match="cannot bridge to itself"):
        parse_spec("id=a,path=/p,bridge=a")


def test_logappend_needs_a_logfile():
    with pytest.raises(SpecError, match="logappend: needs logfile=PATH"):
        parse_spec("id=a,path=/p,logappend=on")


def test_wait_is_only_for_a_server():
    with pytest.raises(SpecError, match="wait.*server=on"):
        parse_spec("id=a,path=/p,wait=on")


def test_a_key_given_twice_is_refused():
    with pytest.raises(SpecError, match="path: given twice"):
        parse_spec("id=a,path=/p,path=/q")


def test_a_value_may_contain_an_equals_sign():
    assert parse_spec("id=a,path=/tmp/a=b").path == "/tmp/a=b"


def test_a_doubled_comma_is_a_literal_comma_as_in_qemu():
    # QEMU's option syntax escapes ',' in a value as ',,'.
    assert parse_spec("id=a,path=/tmp/a,,b,server=on").path == "/tmp/a,b"


# ----- QEMU's id rules ---------------------------------------------------------

@pytest.mark.parametrize("label", ["a", "Z", "a1", "a-b", "a.b", "a_b", "A.b-c_9", "x" * 128])
def test_valid_ids(label):
    assert parse_spec(f"id={label},path=/p").id == label


@pytest.mark.parametrize("label", ["1a", "-a", ".a", "_a", "a b", "a/b", "a:b", "é", "a+", "x" * 129])
def test_invalid_ids_name_the_rule(label):
    with pytest.raises(SpecError, match=r"chardev id: .*accepted: a letter, then letters, digits"):
        parse_spec(f"id={label},path=/p")


@pytest.mark.parametrize("text", ["socket,path=/p", "socket,id=,path=/p"])
def test_missing_id_is_refused(text):
    with pytest.raises(SpecError, match="chardev id: missing"):
        parse_spec(text)


# ----- booleans, bare flags, the leading `socket` --------------------------------

@pytest.mark.parametrize("word, value", [("on", True), ("true", True), ("yes", True),
                                         ("off", False), ("false", False), ("no", False),
                                         ("ON", True), ("Off", False)])
def test_booleans_take_on_off_true_false_yes_no(word, value):
    assert parse_spec(f"id=a,path=/p,server={word}").server is value
    assert parse_spec(f"id=a,path=/p,support-local-migration={word}").support_local_migration is value


@pytest.mark.parametrize("word", ["1", "0", "y", "enabled", ""])
def test_a_bad_boolean_names_the_accepted_words(word):
    with pytest.raises(SpecError, match="server: .*accepted: on/off, true/false, yes/no"):
        parse_spec(f"id=a,path=/p,server={word}")


def test_bare_server_means_server_on():
    assert parse_spec("socket,id=a,path=/p,server").server is True
    assert parse_spec("socket,id=a,path=/p,server,wait").wait is True


def test_a_bare_key_that_is_not_a_flag_needs_a_value():
    with pytest.raises(SpecError, match="path: needs a value"):
        parse_spec("id=a,path")


@pytest.mark.parametrize("flags, server, wait", [
    ("server,nowait", True, False),
    ("server,wait", True, True),
    ("noserver", False, False),
    ("noserver,nowait", False, False),
    ("nowait,server", True, False),
])
def test_qemus_flag_forms_a_key_alone_is_on_and_with_no_in_front_off(flags, server, wait):
    # Issue 21: `server,nowait`, as QEMU's documentation writes it, was refused
    # with `nowait: unknown key`.
    spec = parse_spec(f"socket,id=a,path=/x,{flags}")
    assert (spec.server, spec.wait) == (server, wait)


@pytest.mark.parametrize("flag, field, value", [
    ("support-local-migration", "support_local_migration", True),
    ("nosupport-local-migration", "support_local_migration", False),
    ("nodelay", "nodelay", True),  # a key of its own, as QEMU takes it: TCP_NODELAY on
    ("nonodelay", "nodelay", False),
    ("delay", "nodelay", False),  # QEMU's older inverse key
    ("delay=off", "nodelay", True),
    ("nodelay,delay=off", None, "delay: given with nodelay=, which replaced it"),
    ("local-incoming", "local_incoming", True),
    ("logfile=/l,logappend", "logappend", True),
    ("logfile=/l,nologappend", "logappend", False),
])
def test_every_boolean_key_takes_the_flag_forms(flag, field, value):
    if field is None:
        with pytest.raises(SpecError, match=value):
            parse_spec(f"id=a,host=h,port=1,{flag}")
        return
    assert getattr(parse_spec(f"id=a,host=h,port=1,{flag}"), field) is value


def test_a_flag_given_both_ways_is_given_twice():
    with pytest.raises(SpecError, match="chardev a: wait: given twice"):
        parse_spec("id=a,path=/x,server,wait,nowait")
    with pytest.raises(SpecError, match="chardev a: server: given twice"):
        parse_spec("id=a,path=/x,server=on,noserver")


def test_a_flag_form_with_a_value_is_not_a_key():
    # QEMU strips `no` only from a key given alone: nowait=on is an unknown key.
    with pytest.raises(SpecError, match="chardev a: nowait: unknown key; did you mean wait\\?"):
        parse_spec("id=a,path=/x,server,nowait=on")


def test_qemus_older_reconnect_counts_seconds():
    # QEMU 9.2 renamed reconnect=S to reconnect-ms=MS; command lines written
    # before mean seconds.
    spec = parse_spec("socket,id=a,path=/x,reconnect=2")
    assert spec.reconnect_ms == 2000
    assert spec.to_spec_string() == "socket,id=a,path=/x,reconnect-ms=2000"
    assert parse_spec("id=a,path=/x,reconnect=86400").reconnect_ms == 86_400_000
    qmp_shape = {"id": "a", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": "/x"}}, "reconnect": 3}}}
    assert from_qmp(qmp_shape).reconnect_ms == 3000
    for text, problem in (("reconnect=86401", "reconnect: 86401 is out of range; accepted: 0 to 86400"),
                          ("reconnect=1,reconnect-ms=5", "reconnect: given with reconnect-ms=, which replaced it"),
                          ("server,reconnect=1", "reconnect: only a client reconnects"),
                          ("reconnect", "reconnect: needs a value")):
        with pytest.raises(SpecError, match=f"chardev a: {problem}"):
            parse_spec(f"id=a,path=/x,{text}")


@pytest.mark.parametrize("item, nearest", [
    ("sever=on", "server"),
    ("Server=on", "server"),
    ("reconect=1", "reconnect-ms"),
    ("reconnectms=1", "reconnect-ms"),
    ("frontent=echo", "frontend"),
    ("suport-local-migration=on", "support-local-migration"),
    ("local_incoming=on", "local-incoming"),
    ("nowiat", "nowait"),  # alone: a flag's spellings are offered too
    ("sever", "server"),
    ("fdnmae=x", "fdname"),
])
def test_an_unknown_key_is_told_the_nearest_known_one(item, nearest):
    with pytest.raises(SpecError) as error:
        parse_spec(f"id=a,path=/x,{item}")
    key = item.partition("=")[0]
    assert str(error.value).startswith(f"chardev a: {key}: unknown key; did you mean {nearest}? accepted: id, path, ")


def test_an_unknown_key_like_no_known_one_gets_the_list_alone():
    with pytest.raises(SpecError) as error:
        parse_spec("id=a,path=/x,colour=red")
    assert str(error.value) == ("chardev a: colour: unknown key; accepted: id, path, host, port, fd, fdname, server, "
                                "wait, reconnect-ms, nodelay, support-local-migration, local-incoming, frontend, "
                                "bridge, logfile, logappend")


def test_leading_socket_is_optional():
    assert parse_spec("socket,id=a,path=/p") == parse_spec("id=a,path=/p")


def test_backends_fdmig_does_not_hold_are_refused_naming_those_it_does():
    with pytest.raises(SpecError, match="backend: 'vc' is not supported; accepted: socket, pty, serial, "
                                        "pipe, udp, file"):
        parse_spec("vc,id=a")


@pytest.mark.parametrize("text", ["", ",", "socket,", "id=a,,path=/p", "id=a,path=/p,"])
def test_empty_input_or_items_are_refused(text):
    with pytest.raises(SpecError):
        parse_spec(text)


# ----- exactly one address -------------------------------------------------------

@pytest.mark.parametrize("text, given", [
    ("id=a", "none given"),
    ("id=a,path=/p,host=h,port=1", "path and host given"),
    ("id=a,path=/p,fd=3", "path and fd given"),
    ("id=a,fd=3,fdname=x", "fd and fdname given"),
    ("id=a,host=h,port=1,fdname=x", "host and fdname given"),
])
def test_exactly_one_address(text, given):
    with pytest.raises(SpecError, match=f"address: exactly one of path=, host=\\+port=, fd=, fdname= is needed; {given}"):
        parse_spec(text)


def test_port_without_host_and_host_without_port_are_refused():
    with pytest.raises(SpecError, match="port: given without host="):
        parse_spec("id=a,path=/p,port=1")
    with pytest.raises(SpecError, match="port: missing"):
        parse_spec("id=a,host=h")


@pytest.mark.parametrize("value", ["x", "-1", "1.5", "", "0x10", "²", "1" * 5000],
                         ids=["x", "-1", "1.5", "empty", "0x10", "superscript", "5000-digits"])
def test_a_bad_number_is_refused_with_the_range(value):
    with pytest.raises(SpecError, match="port: .*accepted: 1 to 65535"):
        parse_spec(f"id=a,host=h,port={value}")
    with pytest.raises(SpecError, match="reconnect-ms: .*accepted: 0 to 86400000"):
        parse_spec(f"id=a,path=/p,reconnect-ms={value}")


def test_fd_number_must_be_ascii_digits_and_a_c_int():
    # Regression: "²".isdigit() is true, and int("²") raised ValueError.
    for fd in ("²", "٣", "99999999999", "1" * 5000):
        with pytest.raises(SpecError, match="chardev a: fd:"):
            parse_spec(f"id=a,fd={fd}")
    assert parse_spec("id=a,fd=2147483647").fd == "2147483647"


def test_unix_path_length_limit_is_sun_path():
    assert parse_spec("id=a,path=/" + "x" * (UNIX_PATH_MAX - 1)).path
    with pytest.raises(SpecError, match=f"path: 108 bytes is too long.*at most {UNIX_PATH_MAX} bytes"):
        parse_spec("id=a,path=/" + "x" * UNIX_PATH_MAX)
    # bytes, not characters
    with pytest.raises(SpecError, match="path: 108 bytes"):
        parse_spec("id=a,path=/" + "é" * 53 + "x")


def test_reconnect_ms_is_only_for_a_client():
    assert parse_spec("id=a,path=/p,reconnect-ms=20").reconnect_ms == 20
    assert parse_spec("id=a,path=/p,server=on,reconnect-ms=0").reconnect_ms == 0
    with pytest.raises(SpecError, match="reconnect-ms: only a client reconnects"):
        parse_spec("id=a,path=/p,server=on,reconnect-ms=20")


# ----- rules across chardevs ----------------------------------------------------------

def test_check_set_refuses_duplicate_labels_and_dangling_bridges():
    a, b = parse_spec("id=a,path=/a"), parse_spec("id=b,path=/b,bridge=a")
    check_set([a, b])
    with pytest.raises(SpecError, match="id: duplicate label 'a'"):
        check_set([a, parse_spec("id=a,path=/c")])
    with pytest.raises(SpecError, match="bridge: 'zz' names no chardev; accepted: one of a$"):
        check_set([a, parse_spec("id=b,path=/b,bridge=zz")])
    with pytest.raises(SpecError, match="bridge: 'a' is bridged by more than one chardev"):
        check_set([a, b, parse_spec("id=c,path=/c,bridge=a")])
    with pytest.raises(SpecError, match="bridge: 'a' already has frontend echo"):
        check_set([parse_spec("id=a,path=/a,frontend=echo"), b])


# ----- QMP shape --------------------------------------------------------------------------

def test_to_qmp_is_qemus_nested_chardev_add_shape():
    spec = parse_spec("id=app,path=/run/app.sock,reconnect-ms=20,support-local-migration=on")
    assert spec.to_qmp() == {"id": "app", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": "/run/app.sock"}},
        "reconnect-ms": 20, "support-local-migration": True}}}
    tcp = parse_spec("id=t,host=::1,port=99,server=on")
    assert tcp.to_qmp()["backend"]["data"] == {
        "addr": {"type": "inet", "data": {"host": "::1", "port": "99"}}, "server": True}
    assert parse_spec("id=f,fd=name").to_qmp()["backend"]["data"]["addr"] == {"type": "fd", "data": {"str": "name"}}
    assert parse_spec("id=f,fdname=x").to_qmp()["backend"]["data"]["addr"] == {"type": "fdname", "data": {"name": "x"}}


def test_from_qmp_takes_qemus_shape_as_qemu_sends_it():
    arguments = {"id": "app", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": "/run/app.sock"}},
        "server": False, "reconnect-ms": 20, "support-local-migration": True}}}
    assert from_qmp(arguments) == ChardevSpec(id="app", kind="unix", path="/run/app.sock", reconnect_ms=20,
                                              support_local_migration=True)
    inet = {"id": "t", "backend": {"type": "socket", "data": {
        "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "4444"}}, "server": True}}}
    assert from_qmp(inet).port == 4444


@pytest.mark.parametrize("arguments, match", [
    ([], "arguments must be an object"),
    ({"id": "a"}, "'backend' is missing"),
    ({"id": "a", "backend": {"type": "vc", "data": {}}}, "backend type 'vc' is not supported"),
    ({"id": "a", "backend": {"type": "socket", "data": {}}}, "backend.data.addr' is missing"),
    ({"id": "a", "backend": {"type": "socket", "data": {"addr": {"type": "unix"}}}}, "addr.data' is missing"),
    ({"id": "a", "backend": {"type": "socket", "data": {"addr": {"type": "vsock", "data": {}}}}},
     "address type 'vsock' is not supported"),
    ({"id": 5, "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/p"}}}}},
     "'id' is missing or not a string"),
    ({"id": "a", "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/p"}},
                                                         "server": [1]}}}, "Invalid parameter type for 'server'"),
    ({"id": "a", "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/p"}},
                                                         "server": 1}}}, "server: '1' is not a boolean"),
    ({"id": "a", "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/p"}},
                                                         "reconnect-ms": True}}}, "reconnect-ms: 'True' is not a number"),
    ({"id": "a", "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/p"}},
                                                         "colour": "red"}}}, "colour: unknown key;"),
])
def test_from_qmp_refuses_malformed_arguments_with_specerror(arguments, match):
    with pytest.raises(SpecError, match=match):
        from_qmp(arguments)


# ----- round trips --------------------------------------------------------------------------

_labels = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_paths = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1, max_size=60) \
    .filter(lambda p: len(p.encode()) <= UNIX_PATH_MAX)


@st.composite
def specs(draw):
    kind = draw(st.sampled_from(["unix", "inet", "fd", "fdname"]))
    server = draw(st.booleans())
    fields = dict(id=draw(_labels), kind=kind, server=server)
    if kind == "unix":
        fields["path"] = draw(_paths)
    elif kind == "inet":
        fields["host"] = draw(st.sampled_from(["127.0.0.1", "::1", "localhost", "fe80::1%lo", "example.org"]))
        fields["port"] = draw(st.integers(0 if server else 1, 65535))
    elif kind == "fd":
        fields["fd"] = draw(st.one_of(st.integers(0, 10000).map(str), _labels))
    else:
        fields["fdname"] = draw(st.text(st.characters(blacklist_characters="\0,", blacklist_categories=("Cs",)),
                                        min_size=1, max_size=20))
    if server:
        fields["wait"] = draw(st.booleans())
    else:
        fields["reconnect_ms"] = draw(st.integers(0, 86_400_000))
    for flag in ("nodelay", "support_local_migration", "local_incoming"):
        fields[flag] = draw(st.booleans())
    if draw(st.booleans()):
        fields["frontend"] = "bridge"
        fields["bridge"] = draw(_labels.filter(lambda b: b != fields["id"]))
    else:
        fields["frontend"] = draw(st.sampled_from(["hold", "echo", "sink"]))
    if draw(st.booleans()):
        fields["logfile"] = draw(_paths)
        fields["logappend"] = draw(st.booleans())
    return ChardevSpec(**fields)


@settings(max_examples=300, deadline=None)
@given(specs())
@example(ChardevSpec(id="a", kind="unix", path="/tmp/a,b", logfile="/l,,og"))
def test_spec_string_round_trip(spec):
    assert parse_spec(spec.to_spec_string()) == spec


_FLAGS = ("server", "wait", "nodelay", "support-local-migration", "local-incoming", "logappend")


@settings(max_examples=200, deadline=None)
@given(specs(), st.randoms(use_true_random=False))
def test_every_boolean_in_qemus_flag_form_parses_to_the_same_spec(spec, random):
    items = [f"{key}={str(value).replace(',', ',,')}" for key, value in spec.to_dict().items()
             if key not in _FLAGS]
    for key in _FLAGS:
        on = getattr(spec, key.replace("-", "_"))
        if key == "logappend" and spec.logfile is None or key == "wait" and not spec.server:
            continue  # refused with their partner key absent, whichever form
        items.append(key if on else f"no{key}")
    random.shuffle(items)
    assert parse_spec(",".join(["socket", *items])) == spec


@settings(max_examples=300, deadline=None)
@given(specs())
def test_qmp_and_dict_round_trip(spec):
    assert from_qmp(spec.to_qmp()) == spec
    assert from_dict(spec.to_dict()) == spec


_spec_words = st.sampled_from(["socket", "id", "path", "host", "port", "fd", "fdname", "server", "wait",
                               "reconnect-ms", "nodelay", "support-local-migration", "local-incoming",
                               "frontend", "bridge", "logfile", "logappend", "=", ",", ",,", "on", "off",
                               "a", "1", "²", "٣", "-1", "[::1]", "/p", "echo", "bridge", "\0", "é", " "])


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.lists(_spec_words, max_size=24).map("".join)))
def test_parse_spec_raises_only_specerror(text):
    try:
        spec = parse_spec(text)
    except SpecError:
        return
    assert isinstance(spec, ChardevSpec)
    assert parse_spec(spec.to_spec_string()) == spec


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, specs().map(lambda s: s.to_qmp()).flatmap(
    lambda q: st.tuples(st.just(q), st.sampled_from(["id", "backend"]), _json).map(
        lambda t: {**t[0], t[1]: t[2]}))))
def test_from_qmp_raises_only_specerror(arguments):
    try:
        from_qmp(arguments)
    except SpecError:
        pass


# ----- no two chardevs on one address (issue 9, part 5) -------------------------------

# Issue 9: serve and attach took two servers on one unix path; the first stayed
# `listening` where nobody reached it, and detaching the second unlinked the file.
@pytest.mark.parametrize("first, second", [
    ("id=a,path=/run/x.sock,server=on", "id=b,path=/run/x.sock,server=on"),
    ("id=a,path=/run/x.sock,server=on", "id=b,path=/run/./y/../x.sock,server=on"),
    ("id=a,path=/run/x.sock,server=on", "id=b,path=//run/x.sock"),  # a client would take its one peer
    ("id=a,path=/run/x.sock", "id=b,path=/run/x.sock,server=on"),
    ("id=a,host=127.0.0.1,port=80,server=on", "id=b,host=127.0.0.1,port=80,server=on"),
    ("id=a,host=127.0.0.1,port=80,server=on", "id=b,host=localhost,port=80,server=on"),
    ("id=a,host=127.0.0.1,port=80,server=on", "id=b,host=0.0.0.0,port=80,server=on"),
    ("id=a,host=0.0.0.0,port=80,server=on", "id=b,host=example.org,port=80,server=on"),
    ("id=a,host=::,port=80,server=on", "id=b,host=127.0.0.1,port=80,server=on"),
    ("id=a,host=::1,port=80,server=on", "id=b,host=[0:0::1],port=80,server=on"),
    ("id=a,host=::1,port=80,server=on", "id=b,host=::,port=80,server=on"),
    ("id=a,host=::ffff:127.0.0.1,port=80,server=on", "id=b,host=127.0.0.1,port=80,server=on"),
    ("id=a,host=Example.ORG,port=80,server=on", "id=b,host=example.org,port=80,server=on"),
])
def test_two_chardevs_on_one_address_are_refused_naming_both(first, second):
    with pytest.raises(SpecError, match=r"^chardev b: (path|host\+port): .*chardev a\b"):
        check_set([parse_spec(first), parse_spec(second)])
    with pytest.raises(SpecError, match=r"^chardev b: .*chardev a\b"):
        check_fits(parse_spec(second), {"a": parse_spec(first)}, incoming=False)


@pytest.mark.parametrize("first, second", [
    ("id=a,path=/run/x.sock", "id=b,path=/run/x.sock"),  # two connections to one service, as QEMU allows
    ("id=a,path=/run/x.sock,server=on", "id=b,path=/run/y.sock,server=on"),
    ("id=a,host=127.0.0.1,port=80,server=on", "id=b,host=127.0.0.1,port=81,server=on"),
    ("id=a,host=127.0.0.1,port=80,server=on", "id=b,host=127.0.0.2,port=80,server=on"),
    ("id=a,host=127.0.0.1,port=80,server=on", "id=b,host=::1,port=80,server=on"),
    ("id=a,host=0.0.0.0,port=80,server=on", "id=b,host=::1,port=80,server=on"),
    ("id=a,host=127.0.0.1,port=80,server=on", "id=b,host=127.0.0.1,port=80"),  # a client of it
    ("id=a,host=127.0.0.1,port=80", "id=b,host=127.0.0.1,port=80"),
    ("id=a,host=127.0.0.1,port=0,server=on", "id=b,host=127.0.0.1,port=0,server=on"),  # fresh ports
    ("id=a,fd=3", "id=b,fdname=web"),
])
def test_chardevs_that_share_no_listening_address_fit(first, second):
    check_set([parse_spec(first), parse_spec(second)])
    check_fits(parse_spec(second), {"a": parse_spec(first)}, incoming=False)


def test_relative_paths_are_compared_in_the_binders_working_directory():
    relative, absolute = parse_spec("id=a,path=x.sock,server=on"), parse_spec("id=b,path=/srv/x.sock,server=on")
    with pytest.raises(SpecError, match="chardev b: path: .*chardev a's"):
        check_set([relative, absolute], cwd="/srv")
    check_set([relative, absolute], cwd="/elsewhere")
    check_set([relative, absolute], cwd="")  # unknown: only the same relative path conflicts
    with pytest.raises(SpecError, match="chardev b: path:"):
        check_set([relative, parse_spec("id=b,path=./x.sock,server=on")], cwd="")


def test_the_held_index_follows_every_change():
    held = Held()
    a = parse_spec("id=a,path=/run/x.sock,server=on")
    b = parse_spec("id=b,path=/run/x.sock,server=on")
    held["a"] = a
    with pytest.raises(SpecError, match="chardev b: path:"):
        check_fits(b, held, incoming=False, addresses=held.addresses)
    del held["a"]
    check_fits(b, held, incoming=False, addresses=held.addresses)
    held["a"] = a
    held.clear()
    check_fits(b, held, incoming=False, addresses=held.addresses)
    held.update(a=a)
    assert held.pop("a") is a and held.pop("a", None) is None
    check_fits(b, held, incoming=False, addresses=held.addresses)


def test_checking_thousands_of_chardevs_is_linear():
    def checking(n):
        chardevs = [parse_spec(f"id=c{i},path=/run/c{i}.sock,server=on") for i in range(n)]
        chardevs += [parse_spec(f"id=t{i},host=127.0.0.1,port={1 + i},server=on") for i in range(n)]
        return lambda: check_set(chardevs)
    small, large = calls(checking(2000)), calls(checking(16000))
    assert large < small * 8 * 1.2, f"{small} calls for 4,000 chardevs, {large} for 32,000"


def test_serve_and_attach_take_qemus_flag_forms(daemons, short_dir, runtime_dir):
    daemons("serve", "--chardev", f"socket,id=app,path={short_dir}/app.sock,server,nowait,frontend=echo")
    with connect_unix(f"{short_dir}/app.sock") as peer:
        assert echoes(peer)
    result = run("attach", f"id=late,path={short_dir}/late.sock,server,nowait,support-local-migration,reconnect=0")
    assert result.returncode == 0, result.stderr
    chardevs = {c["label"]: c for c in status_of(os.path.join(runtime_dir, "default.sock"))["chardevs"]}
    assert (chardevs["app"]["role"], chardevs["app"]["state"]) == ("server", "listening")
    assert chardevs["late"]["role"] == "server" and chardevs["late"]["support-local-migration"] is True


def test_a_running_instance_refuses_a_second_chardev_on_its_addresses_and_the_first_keeps_them(
        daemons, short_dir, runtime_dir):
    # Issue 9: attach took a second server on a path, the first stayed `listening`
    # where nobody reached it, and detaching the second unlinked the socket file.
    path, service = f"{short_dir}/app.sock", f"{short_dir}/service.sock"
    port = free_port()
    daemons("serve", "--chardev", "socket,id=app,path=app.sock,server=on,frontend=echo",
            "--chardev", f"socket,id=web,host=127.0.0.1,port={port},server=on", cwd=short_dir)
    with listener(service) as upstream:
        results = run_many([
            ["attach", f"id=again,path={path},server=on"],  # the instance's app.sock, from another cwd
            ["attach", f"id=self,path={short_dir}/./app.sock"],
            ["attach", f"id=any,host=0.0.0.0,port={port},server=on"],
            ["attach", f"id=up1,path={service}"],
        ])
        again, itself, any_host, first_client = results
        assert first_client.returncode == 0, first_client.stderr
        second_client = run("attach", f"id=up2,path={service}")  # clients share a path, as in QEMU
        assert second_client.returncode == 0, second_client.stderr
        upstream.accept()[0].close()
        upstream.accept()[0].close()
    for result, which, other in ((again, "again: path", "app"), (itself, "self: path", "app"),
                                 (any_host, "any: host+port", "web")):
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"fdmig: chardev {which}: ") and f"chardev {other}" in result.stderr
    control = os.path.join(runtime_dir, "default.sock")
    with qmp.connect(control) as client:  # past the CLI's check: the instance holds the rule itself
        with pytest.raises(FdmigError, match="chardev again: path: .*chardev app's already"):
            client.execute("chardev-add", parse_spec(f"id=again,path={path},server=on").to_qmp())
        labels = {c["label"] for c in client.execute("query-chardev")}
    assert labels == {"app", "web", "up1", "up2"}
    with connect_unix(path) as peer:
        assert echoes(peer)
    # Once app is gone its path is free: the instance's index followed the detach.
    assert run("detach", "app").returncode == 0
    assert not os.path.exists(path)
    result = run("attach", f"id=again,path={path},server=on")
    assert result.returncode == 0, result.stderr


# ----- the CLI: exit 2, one line naming the field and what is accepted ---------------------------

LONG_PATH = "/tmp/" + "x" * 103  # 108 bytes

# case: (serve's arguments, how the message names the chardev and the key, what is accepted)
CLI_MISTAKES = {
    "unknown key": (["--chardev", "socket,id=a,path=/tmp/p,colour=red"], "chardev a: colour:", "accepted: id, path"),
    "misspelt key": (["--chardev", "socket,id=a,path=/tmp/p,sever=on"], "chardev a: sever:",
                     "unknown key; did you mean server? accepted: id, path"),
    "missing id": (["--chardev", "socket,path=/tmp/p"], "chardev id:", "id=LABEL"),
    "bad id": (["--chardev", "socket,id=9a,path=/tmp/p"], "chardev id:", "accepted: a letter"),
    "bad number": (["--chardev", "socket,id=a,host=127.0.0.1,port=http"], "chardev a: port:", "accepted: 1 to 65535"),
    "port out of range": (["--chardev", "socket,id=a,host=127.0.0.1,port=70000"], "chardev a: port:",
                          "accepted: 1 to 65535"),
    "two addresses": (["--chardev", "socket,id=a,path=/tmp/p,fd=3"], "chardev a: address:", "exactly one of path="),
    "reconnect on a server": (["--chardev", "socket,id=a,path=/tmp/p,server=on,reconnect-ms=10"],
                              "chardev a: reconnect-ms:", "only a client"),
    "unix path too long": (["--chardev", f"socket,id=a,path={LONG_PATH}"], "chardev a: path:", "at most 107 bytes"),
    "duplicate label": (["--chardev", "socket,id=a,path=/tmp/p", "--chardev", "socket,id=a,path=/tmp/q"],
                        "chardev a: id:", "duplicate label 'a'"),
    "bridge to a missing label": (["--chardev", "socket,id=a,path=/tmp/p",
                                   "--chardev", "socket,id=c,path=/tmp/q,bridge=b"], "chardev c: bridge:",
                                  "'b' names no chardev; accepted: one of a"),
    "bad boolean": (["--chardev", "socket,id=a,path=/tmp/p,server=maybe"], "chardev a: server:",
                    "accepted: on/off, true/false, yes/no"),
    "unknown frontend": (["--chardev", "socket,id=a,path=/tmp/p,frontend=cat"], "chardev a: frontend:",
                         "accepted: hold, echo, sink, bridge"),
    "other backend": (["--chardev", "vc,id=a"], "chardev a: backend:", "accepted: socket, pty, serial"),
    "a file to echo": (["--chardev", "file,id=a,path=/tmp/f,frontend=echo"], "chardev a: frontend:",
                       "written, never read"),
    "local-incoming on serve": (["--chardev", "socket,id=a,path=/tmp/p,local-incoming=on"],
                                "chardev a: local-incoming:", "only migrate-in"),
    # Issue 9: with several chardevs, the message said `chardev frontend:`, as if
    # that were the chardev's name, and left the user to find which one.
    "a key of the second chardev": (["--chardev", "socket,id=a,path=/tmp/p",
                                     "--chardev", "socket,frontend=echoo,id=b,path=/tmp/q"],
                                    "chardev b: frontend:", "'echoo' is not known; accepted: hold, echo"),
    "the second chardev without an id": (["--chardev", "socket,id=a,path=/tmp/p", "--chardev", "socket,path=/tmp/q"],
                                         "chardev #2: id:", "id=LABEL"),
    "two servers on one path": (["--chardev", "socket,id=a,path=/tmp/fdmig-test-p,server=on",
                                 "--chardev", "socket,id=b,path=/tmp/../tmp/fdmig-test-p,server=on"],
                                "chardev b: path:", "is chardev a's already"),
    "two servers on one TCP address": (["--chardev", "socket,id=a,host=0.0.0.0,port=5999,server=on",
                                        "--chardev", "socket,id=b,host=localhost,port=5999,server=on"],
                                       "chardev b: host+port:", "the listening address of chardev a"),
}


def test_every_spec_mistake_on_serve_exits_2_with_one_line(runtime_dir):
    results = run_many([["serve", *args] for args, _, _ in CLI_MISTAKES.values()])
    failures = []
    for (case, (args, which, accepted)), result in zip(CLI_MISTAKES.items(), results):
        lines = result.stderr.splitlines()
        ok = (result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"fdmig: {which} ")
              and accepted in lines[0] and not result.stdout)
        if not ok:
            failures.append(f"{case}: exit {result.returncode}, stderr {result.stderr!r}")
    assert not failures, "\n".join(failures)
