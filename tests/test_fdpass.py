"""SCM_RIGHTS over real socketpairs."""

import os
import socket

import pytest

from fdmig.fdpass import MAX_FDS_PER_MSG, FdPassError, close_fds, recv_with_fds, send_with_fds
from fdmig.migration.wire import (NEED_DATA, Accept, Held, Hello, MigrationCodec, Precopy, Role, Section, State, Table,
                                  Transfer)


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


@pytest.fixture
def files(tmp_path):
    """Open fds on distinct files, so each has its own inode to recognise it by."""
    opened = []

    def open_files(n):
        for i in range(n):
            path = tmp_path / f"f{len(opened)}"
            path.write_bytes(b"")
            opened.append(os.open(path, os.O_RDONLY))
        return opened[-n:]

    yield open_files
    close_fds(opened)


def open_fd_count():
    return len(os.listdir("/proc/self/fd"))


def inode(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def test_the_most_fds_one_message_carries_arrive_in_order_as_the_same_files(pair, files):
    a, b = pair
    sent = files(MAX_FDS_PER_MSG)
    assert send_with_fds(a, b"x", sent) == 1
    data, received = recv_with_fds(b, 100)
    try:
        assert data == b"x"
        assert len(received) == MAX_FDS_PER_MSG
        assert not set(received) & set(sent)  # new fds...
        assert [inode(fd) for fd in received] == [inode(fd) for fd in sent]  # ...on the same files, in order
    finally:
        close_fds(received)


def test_received_fds_are_close_on_exec(pair, files):
    a, b = pair
    sent = files(2)
    for fd in sent:
        os.set_inheritable(fd, True)
    send_with_fds(a, b"x", sent)
    _data, received = recv_with_fds(b, 100)
    try:
        assert [os.get_inheritable(fd) for fd in received] == [False, False]
    finally:
        close_fds(received)


def test_more_fds_than_the_kernel_takes_is_a_value_error(pair, files):
    a, _b = pair
    with pytest.raises(ValueError, match="254 fds"):
        send_with_fds(a, b"x", files(MAX_FDS_PER_MSG + 1))


def test_fds_need_a_byte_to_ride_with(pair, files):
    a, _b = pair
    with pytest.raises(ValueError):
        send_with_fds(a, b"", files(1))


def test_data_without_fds_carries_no_ancillary_data(pair):
    a, b = pair
    assert send_with_fds(a, b"hello", []) == 5
    assert recv_with_fds(b, 100) == (b"hello", [])


def test_eof_reads_as_empty_data(pair):
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    assert recv_with_fds(b, 100) == (b"", [])


def test_a_receiver_with_room_for_fewer_fds_gets_fdpasserror_and_nothing_leaks(pair, files):
    a, b = pair
    sent = files(10)
    before = open_fd_count()
    send_with_fds(a, b"x", sent)
    with pytest.raises(FdPassError, match="ancillary data truncated"):
        recv_with_fds(b, 100, maxfds=3)
    assert open_fd_count() == before


def test_a_receiver_expecting_no_fds_gets_fdpasserror_and_nothing_leaks(pair, files):
    a, b = pair
    sent = files(2)
    before = open_fd_count()
    send_with_fds(a, b"x", sent)
    with pytest.raises(FdPassError):
        recv_with_fds(b, 100, maxfds=0)
    assert open_fd_count() == before


def test_ancillary_data_other_than_fds_is_refused_and_nothing_leaks(pair, files):
    a, b = pair
    # With SO_PASSCRED every message also brings SCM_CREDENTIALS, which we never expect.
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sent = files(3)
    before = open_fd_count()
    send_with_fds(a, b"x", sent)
    with pytest.raises(FdPassError, match="unexpected ancillary data"):
        recv_with_fds(b, 100, maxfds=MAX_FDS_PER_MSG + 16)
    assert open_fd_count() == before


def test_fds_arrive_with_the_first_byte_of_their_message(pair, files):
    a, b = pair
    sent = files(2)
    send_with_fds(a, b"0123456789", sent)
    data, first = recv_with_fds(b, 3)
    data2, rest = recv_with_fds(b, 100)
    try:
        assert (data, data2) == (b"012", b"3456789")
        assert len(first) == 2 and rest == []
    finally:
        close_fds(first + rest)


def test_a_full_nonblocking_socket_raises_blocking_io_error_and_sends_no_fds(pair, files):
    a, b = pair
    a.setblocking(False)
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        while True:
            a.send(b"\0" * 65536)
    with pytest.raises(BlockingIOError):
        send_with_fds(a, b"x", files(1))
    received = []
    try:
        while True:
            _data, fds = recv_with_fds(b, 1 << 20)
            received += fds
    except BlockingIOError:
        pass
    assert received == []


def test_close_fds_ignores_fds_already_closed(files):
    fds = files(2)
    os.close(fds[0])
    close_fds(fds)
    with pytest.raises(OSError):
        os.fstat(fds[1])


def test_codec_chunks_carry_their_fds_over_a_real_socket(pair, files):
    # The codec's assumption about the kernel: one chunk per sendmsg(), its fds on
    # its first byte, reported with the read that returns that byte, however small
    # the reads.
    a, b = pair
    source = MigrationCodec(Role.SOURCE, max_frame=512)
    target = MigrationCodec(Role.TARGET, max_frame=512)
    sent = files(40)
    sections = tuple(Section(f"c{i}", {"i": i}, b"out" * i, {"conn": sent[2 * i], "listener": sent[2 * i + 1]})
                     for i in range(20))
    table_chunks = source.send(Hello("web", os.getpid(), "0.1.0")) + source.send(Table({}, ()))
    target_events, received = [], []

    def pump(chunks, bufsize):
        for chunk in chunks:
            n = send_with_fds(a, chunk.data, chunk.fds)
            a.sendall(chunk.data[n:])  # the rest without the fds
        # Everything fits the socket buffer, so send it all, then read it in small reads.
        total = sum(len(c.data) for c in chunks)
        got = 0
        while got < total:
            data, fds = recv_with_fds(b, bufsize)
            got += len(data)
            received.extend(fds)
            target.receive_data(data, len(fds))
            while (event := target.next_event()) is not NEED_DATA:
                target_events.append(event)

    try:
        pump(table_chunks, 7)
        for chunk in target.send(Accept()):
            source.receive_data(chunk.data)
        assert source.next_event() == Accept()
        pump(source.send(Precopy(())), 7)
        for chunk in target.send(Held()):
            source.receive_data(chunk.data)
        assert source.next_event() == Held()
        transfer_chunks = source.send(Transfer(sections))
        assert len([c for c in transfer_chunks if c.fds]) > 1
        pump(transfer_chunks, 50)
        assert target.state is State.TRANSFER_DONE
        [transfer] = [e for e in target_events if isinstance(e, Transfer)]
        for sent_section, got in zip(sections, transfer.sections):
            assert got.outbuf == sent_section.outbuf
            assert {role: inode(received[i]) for role, i in got.fds.items()} == {
                role: inode(fd) for role, fd in sent_section.fds.items()}
        assert target.fds_claimed == target.fds_received == len(received) == 40
    finally:
        close_fds(received)
