"""Two instances never share a listening address: a second one that would take a
unix path (or a TCP address) a live instance listens on exits 2 naming that
instance and chardev, and the first serves on; a path no process listens on is
taken over, as before."""

import asyncio
import os
import socket

from qemu.qmp import ExecuteError, QMPClient

from tests.helpers import connect_unix, echoes, run, status_of

ECHO = "socket,id={label},path={path},server=on,frontend=echo"


def _first(daemons, runtime_dir, path):
    first = daemons("serve", "--name", "web", "--chardev", ECHO.format(label="app", path=path))
    return first, os.path.join(runtime_dir, "web.sock")


def test_a_second_serve_on_a_live_unix_path_is_refused_naming_its_holder(daemons, short_dir, runtime_dir):
    # Regression: the second instance took the path, and its exit removed it.
    path = os.path.join(short_dir, "app.sock")
    first, control = _first(daemons, runtime_dir, path)
    result = run("serve", "--name", "other", "--chardev", ECHO.format(label="x", path=path), timeout=20)
    assert result.returncode == 2, result.stderr
    assert "instance 'web'" in result.stderr and "chardev app" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert echoes(connect_unix(path)), "the first instance no longer answers at its path"
    assert status_of(control)["chardevs"][0]["state"] in ("listening", "connected")


def test_a_relative_path_is_compared_as_the_instance_resolves_it(daemons, short_dir, runtime_dir):
    path = os.path.join(short_dir, "app.sock")
    _first(daemons, runtime_dir, path)
    result = run("serve", "--name", "other", "--chardev", ECHO.format(label="x", path="app.sock"),
                 cwd=short_dir, timeout=20)
    assert result.returncode == 2 and "instance 'web'" in result.stderr, result.stderr


def test_attach_to_another_instances_path_is_refused(daemons, short_dir, runtime_dir):
    path = os.path.join(short_dir, "app.sock")
    _first(daemons, runtime_dir, path)
    daemons("serve", "--name", "other")
    result = run("attach", "--name", "other", ECHO.format(label="x", path=path))
    assert result.returncode == 2 and "instance 'web'" in result.stderr, result.stderr
    assert echoes(connect_unix(path))


def test_a_tcp_address_of_a_live_instance_is_refused_naming_it(daemons, runtime_dir):
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    spec = "socket,id={label},host=127.0.0.1,port=%d,server=on,frontend=echo" % port
    daemons("serve", "--name", "web", "--chardev", spec.format(label="app"))
    result = run("serve", "--name", "other", "--chardev", spec.format(label="x"), timeout=20)
    assert result.returncode == 2, result.stderr
    assert "instance 'web'" in result.stderr and "chardev app" in result.stderr, result.stderr


def test_a_path_another_program_listens_on_is_refused(daemons, short_dir):
    path = os.path.join(short_dir, "theirs.sock")
    theirs = socket.socket(socket.AF_UNIX)
    theirs.bind(path)
    theirs.listen()
    result = run("serve", "--name", "other", "--chardev", ECHO.format(label="x", path=path), timeout=20)
    # Named by its pid: a service orphaned by a holder killed outright, say.
    assert result.returncode == 2 and f"is in use: pid {os.getpid()} " in result.stderr, result.stderr
    theirs.settimeout(10)
    client = connect_unix(path)
    assert theirs.accept()[0] is not None, "their path was taken"
    client.close()
    theirs.close()


def test_a_path_no_process_listens_on_is_taken_over(daemons, short_dir):
    path = os.path.join(short_dir, "stale.sock")
    left = socket.socket(socket.AF_UNIX)
    left.bind(path)
    left.close()  # a socket file that nothing listens on: what a killed instance leaves
    daemons("serve", "--name", "web", "--chardev", ECHO.format(label="app", path=path))
    assert echoes(connect_unix(path))


def test_a_migration_target_may_name_its_sources_path(daemons, short_dir, runtime_dir):
    # The target opens the path afresh once its source hands it over: not a conflict.
    path = os.path.join(short_dir, "app.sock")
    _first(daemons, runtime_dir, path)
    target = daemons("migrate-in", "--name", "web", "--chardev", ECHO.format(label="app", path=path), ready=False)
    result = run("migrate-out", "--name", "web", timeout=40)
    assert result.returncode == 0, result.stderr + target.stderr()[-2000:]
    target.wait_ready()
    assert echoes(connect_unix(path))


def test_attach_of_a_tcp_port_another_program_holds_exits_2(daemons):
    theirs = socket.create_server(("127.0.0.1", 0))
    port = theirs.getsockname()[1]
    daemons("serve", "--name", "web")
    result = run("attach", "--name", "web", f"id=x,host=127.0.0.1,port={port},server=on")
    assert result.returncode == 2 and "Address already in use" in result.stderr, result.stderr
    theirs.close()


def test_a_path_through_a_symlinked_directory_is_the_same_address(daemons, short_dir, runtime_dir):
    # Regression: the second instance took the first one's socket file through a
    # symlink to its directory, and removed it when it stopped.
    os.mkdir(os.path.join(short_dir, "real"))
    os.symlink(os.path.join(short_dir, "real"), os.path.join(short_dir, "link"))
    path = os.path.join(short_dir, "real", "app.sock")
    _first(daemons, runtime_dir, path)
    result = run("serve", "--name", "other", "--chardev",
                 ECHO.format(label="x", path=os.path.join(short_dir, "link", "app.sock")), timeout=20)
    assert result.returncode == 2 and "instance 'web'" in result.stderr, result.stderr
    assert echoes(connect_unix(path))


def test_qmp_chardev_add_of_another_instances_path_is_refused(daemons, short_dir, runtime_dir):
    # Not only the CLI's attach: a client speaking QMP itself (QEMU's own library)
    # is refused too, and the first instance serves on at its path.
    path = os.path.join(short_dir, "app.sock")
    _first(daemons, runtime_dir, path)
    daemons("serve", "--name", "other")

    async def add():
        client = QMPClient("test")
        await client.connect(os.path.join(runtime_dir, "other.sock"))
        try:
            await client.execute("chardev-add", {"id": "x", "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": path}}, "server": True}}})
        except ExecuteError as exc:
            return str(exc)
        finally:
            await client.disconnect()
        return None

    refused = asyncio.run(asyncio.wait_for(add(), 15))
    assert refused is not None and "instance 'web'" in refused and "chardev app" in refused, refused
    assert echoes(connect_unix(path)), "the first instance no longer answers at its path"
    assert status_of(os.path.join(runtime_dir, "other.sock"))["chardevs"] == []


def test_a_qmp_chardev_add_is_refused_if_a_migration_began_while_it_was_checked(daemons, short_dir, runtime_dir):
    # The check asks every instance of the runtime dir, and one that does not
    # answer holds it for a while; a migration may begin meanwhile, and a chardev
    # added then would be missing from the table already sent: lost at the handover.
    daemons("serve", "--name", "web", "--capability", "local-char-socket")
    silent = socket.socket(socket.AF_UNIX)  # in the runtime dir the instance made
    silent.bind(os.path.join(runtime_dir, "hung.sock"))
    silent.listen()
    silent.settimeout(20)
    # The target stops itself once it has the table: the migration stays under way.
    target = daemons("migrate-in", "--name", "web", ready=False,
                     env=dict(os.environ, FDMIG_FAULT="target-after-table=stop"))
    control = os.path.join(runtime_dir, "web.sock")
    path = os.path.join(short_dir, "late.sock")

    async def main():
        adder, migrator = QMPClient("adder"), QMPClient("migrator")
        await adder.connect(control)
        await migrator.connect(control)
        try:
            add = asyncio.ensure_future(adder.execute("chardev-add", {"id": "late", "backend": {
                "type": "socket", "data": {"addr": {"type": "unix", "data": {"path": path}}, "server": True}}}))
            held, _ = await asyncio.get_running_loop().run_in_executor(None, silent.accept)  # the check waits on us
            await migrator.execute("migrate", {"uri": f"unix:{runtime_dir}/web.migrate.sock",
                                               "x-fdmig-timeout": 60})
            await asyncio.get_running_loop().run_in_executor(
                None, os.waitid, os.P_PID, target.pid, os.WSTOPPED | os.WNOWAIT)  # it has the table
            assert (await migrator.execute("query-migrate"))["status"] == "setup"
            held.close()  # the check goes on, and finds the migration under way
            try:
                await add
            except ExecuteError as exc:
                return str(exc)
            return None
        finally:
            await adder.disconnect()
            await migrator.disconnect()

    try:
        refused = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        silent.close()
        target.proc.kill()  # stopped: it would not hear SIGTERM
    assert refused is not None and "migration process in progress" in refused, refused
    assert not os.path.exists(path)
