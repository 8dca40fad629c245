"""Fixtures: a private runtime dir per test and a factory of fdmig daemons; and the
needs(...) mark (tests/helpers.py): a skip where a program is missing, a failure
under FDMIG_TEST_REQUIRE_TOOLS=1."""

import json
import os
import shutil
import signal
import tempfile

import pytest

from tests.helpers import Daemon, missing, require, run, tools_required


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*programs): runs these programs from Debian packages "
                                       "(tests.helpers.needs; FDMIG_TEST_REQUIRE_TOOLS=1 fails where they are missing)")


def pytest_collection_modifyitems(items):
    """A test marked needs(...) whose programs are missing skips, reported at the test."""
    if tools_required():
        return  # pytest_runtest_setup fails it instead
    for item in items:
        why = missing(*_needed_by(item))
        if why is not None:
            item.add_marker(pytest.mark.skip(reason=why))


def pytest_runtest_setup(item):
    require(*_needed_by(item))


def _needed_by(item) -> list[str]:
    return [program for mark in item.iter_markers("needs") for program in mark.args]


@pytest.fixture
def short_dir():
    """A short directory: unix socket paths must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix="fdm-", dir="/tmp")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def runtime_dir(short_dir, monkeypatch):
    path = os.path.join(short_dir, "rt")
    monkeypatch.setenv("FDMIG_RUNTIME_DIR", path)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    return path


@pytest.fixture
def daemons(short_dir, runtime_dir):
    """Factory: daemons("serve", "--chardev", ...) starts one and waits for READY=1."""
    started = []

    def start(*args, **kwargs):
        daemon = Daemon(args, short_dir, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


@pytest.fixture
def last_instance():
    """Stops whatever instance `web` ends up as (spawned targets are in their own session)."""
    yield
    result = run("status", "--json", "--name", "web")
    if result.returncode == 0:
        os.kill(json.loads(result.stdout)["pid"], signal.SIGTERM)
