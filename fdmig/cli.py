"""The command line: parse, call the control client, render. Nothing else.

Heavy modules (asyncio, rich, psutil) are imported inside the commands that use
them, so `fdmig --version` and `fdmig status` start fast.
"""

import os
import sys
import time

import click

from fdmig import __version__, paths, qmp
from fdmig.errors import FdmigError, NoInstanceError, SpecError, TimeoutExpired
from fdmig.spec import ChardevSpec, check_incoming, check_label, check_set, parse_spec


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"fdmig: {self.format_message()}", err=True)


class Group(click.Group):
    """Turns fdmig's exceptions into one line on stderr and their exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FdmigError as exc:
            raise CliError(str(exc), exc.exit_code) from None


def _complete_names(ctx, param, incomplete):
    return [n for n in paths.instance_names() if n.startswith(incomplete)]


def _complete_labels(ctx, param, incomplete):
    try:
        with qmp.connect(_control_path(ctx.params.get("name"), ctx.params.get("control")), timeout=1) as client:
            labels = [c["label"] for c in client.execute("query-chardev")]
    except Exception:
        return []
    if param.name == "wait":
        from fdmig.chardev import STATES
        if "=" in incomplete:
            label, _, part = incomplete.partition("=")
            return [f"{label}={s}" for s in STATES if s.startswith(part)]
        return [f"{label}=" for label in labels if label.startswith(incomplete)]
    return [label for label in labels if label.startswith(incomplete)]


def instance_options(func):
    func = click.option("--control", metavar="PATH",
                        help="Control socket path (default: <runtime-dir>/<name>.sock).")(func)
    func = click.option("--name", "-n", metavar="NAME", shell_complete=_complete_names,
                        help="Instance name (default: 'default').")(func)
    return func


def _control_path(name: str | None, control: str | None) -> str:
    if name is not None and control is not None:
        raise SpecError("--name and --control both given; accepted: one of them")
    if control is not None:
        return control
    name = name or "default"
    try:
        check_label(name, field="--name")
    except SpecError:
        raise SpecError(f"--name '{name}' is not valid; accepted: a letter, then letters, digits, "
                        "'-', '.', '_'") from None
    return paths.control_path(name)


def _instance_name(name: str | None, control: str | None) -> str:
    if name:
        return name
    if control:
        return paths.instance_name(control)
    return "default"


def _prepare_control(control_path: str) -> None:
    """The runtime dir is created 0700 (and checked) when the control path is in it."""
    runtime = paths.runtime_dir()
    if os.path.dirname(os.path.abspath(control_path)) == os.path.abspath(runtime):
        paths.ensure_private_dir(runtime)


def _parse_specs(texts) -> list[ChardevSpec]:
    chardevs = [parse_spec(text) for text in texts]
    check_set(chardevs)
    return chardevs


def _setup_logging(name: str) -> None:
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"fdmig[{name}]: %(message)s")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="fdmig")
def main():
    """Hand live socket connections from one process to another.

    An instance holds labelled socket chardevs (QEMU's -chardev socket syntax) and
    answers QMP on a control socket; migrate-out/migrate-in move its connections
    live to a new process: the peers see a pause, never a reconnect.
    """


@main.command()
@instance_options
@click.option("--chardev", "chardev_specs", multiple=True, metavar="SPEC",
              help="A chardev: socket,id=LABEL,path=P|host=H,port=N|fd=N|fdname=NAME[,server=on]...")
@click.option("--capability", "capabilities", multiple=True, type=click.Choice(["local-char-socket"]),
              help="Enable a migration capability.")
def serve(name, control, chardev_specs, capabilities):
    """Run an instance holding the given chardevs until SIGTERM or QMP quit."""
    control_path = _control_path(name, control)
    chardevs = _parse_specs(chardev_specs)
    for spec in chardevs:
        check_incoming(spec, incoming=False)
    _prepare_control(control_path)
    instance_name = _instance_name(name, control)
    _setup_logging(instance_name)
    from fdmig.daemon import Instance, run
    instance = Instance(instance_name, control_path, capabilities)
    sys.exit(run(instance, chardevs))


@main.command()
@instance_options
@click.argument("spec", metavar="SPEC")
def attach(name, control, spec):
    """Add a chardev to a running instance (QMP chardev-add).

    With fd=N, this command's own descriptor N is passed to the instance."""
    chardev = parse_spec(spec)
    with qmp.connect(_control_path(name, control)) as client:
        _check_against(chardev, client.execute("x-fdmig-status"))
        if chardev.fd_is_number:
            fd = int(chardev.fd)
            try:
                os.fstat(fd)
            except OSError:
                raise SpecError(f"chardev fd: {fd} is not an open descriptor of this command") from None
            passed_name = f"attach-{chardev.id}"
            client.execute("getfd", {"fdname": passed_name}, fds=(fd,))
            chardev = ChardevSpec(**{**chardev.__dict__, "fd": passed_name})
        try:
            client.execute("chardev-add", chardev.to_qmp())
        except FdmigError:
            if chardev.kind == "fd" and chardev.fd.startswith("attach-"):
                try:
                    client.execute("closefd", {"fdname": chardev.fd})  # do not leave our fd behind
                except FdmigError:
                    pass  # the instance had taken it already, and closed it
            raise
        state = next((c["state"] for c in client.execute("x-fdmig-status")["chardevs"]
                      if c["label"] == chardev.id), "?")
    click.echo(f"attached {chardev.id}: {chardev.role} {chardev.address} ({state})")


def _check_against(chardev: ChardevSpec, status: dict) -> None:
    """The SPEC rules that depend on what the instance holds, checked here so that
    a bad SPEC exits 2 whether the mistake is in it alone or in how it fits."""
    from fdmig.spec import check_fits
    held = {c["label"]: parse_spec(c["spec"]) for c in status["chardevs"]}
    check_fits(chardev, held, incoming=status["state"] == "inmigrate")


@main.command()
@instance_options
@click.argument("label", shell_complete=_complete_labels)
def detach(name, control, label):
    """Remove a chardev from a running instance (QMP chardev-remove); its peer sees EOF."""
    with qmp.connect(_control_path(name, control)) as client:
        client.execute("chardev-remove", {"id": label})
    click.echo(f"detached {label}")


def _parse_wait(value: str) -> tuple[str, str]:
    from fdmig.chardev import STATES
    label, eq, state = value.partition("=")
    if not eq or not label:
        raise SpecError(f"--wait '{value}': expected LABEL=STATE")
    if state not in STATES:
        raise SpecError(f"--wait: state '{state}' is not known; accepted: {', '.join(STATES)}")
    return label, state


@main.command()
@instance_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@click.option("--watch", is_flag=True, help="Refresh the table until interrupted.")
@click.option("--wait", metavar="LABEL=STATE", shell_complete=_complete_labels,
              help="Exit 0 once chardev LABEL is in STATE; 4 on timeout.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="S",
              help="With --wait: give up after S seconds (default 30).")
def status(name, control, as_json, watch, wait, timeout):
    """Show an instance: its chardevs, peers, counters and last migration."""
    control_path = _control_path(name, control)
    if timeout is not None and not wait:
        raise SpecError("--timeout goes with --wait LABEL=STATE")
    if wait:
        label, state = _parse_wait(wait)
        _wait_for_state(control_path, label, state, 30.0 if timeout is None else timeout)
        return
    if watch:
        _watch(control_path, as_json)
        return
    with qmp.connect(control_path) as client:
        data = client.execute("x-fdmig-status")
    _print_status(data, as_json)


def _print_status(data: dict, as_json: bool) -> None:
    from fdmig import render
    if as_json:
        click.echo(render.as_json(data))
    elif sys.stdout.isatty():
        from rich.console import Console
        Console().print(render.rich_table(data))
    else:
        click.echo(render.plain(data))


def _watch(control_path: str, as_json: bool) -> None:
    """Status once a second, riding over a control handover (a migration) or an
    instance not up yet: a live table on a terminal, a stream of prints elsewhere."""
    from fdmig import render
    live = None
    if not as_json and sys.stdout.isatty():
        from rich.live import Live
        live = Live(auto_refresh=False)
        live.start()
    try:
        while True:
            try:
                with qmp.connect(control_path) as client:
                    data = client.execute("x-fdmig-status")
            except FdmigError as exc:  # NoInstanceError included
                note = f"{render.timestamp()} {exc}"
                if live is None:
                    click.echo(note, err=True)
                else:
                    from rich.text import Text
                    live.update(Text(note), refresh=True)
            else:
                if live is None:
                    _print_status(data, as_json)
                else:
                    live.update(render.rich_table(data), refresh=True)
            time.sleep(1)
    finally:
        if live is not None:
            live.stop()


def _wait_for_state(control_path: str, label: str, state: str, timeout: float) -> None:
    """Wait on the instance's chardev events, reconnecting across a control handover
    (a migration) and until the instance first appears."""
    deadline = time.monotonic() + timeout
    seen = f"no instance answers at {control_path}"
    while True:
        try:
            with qmp.connect(control_path, timeout=max(0.1, min(5.0, deadline - time.monotonic()))) as client:
                while True:
                    chardevs = {c["label"]: c["state"]
                                for c in client.execute("x-fdmig-status")["chardevs"]}
                    current = chardevs.get(label)
                    if current == state:
                        return
                    seen = f"chardev {label} is {current}" if current else f"no chardev {label}"
                    client.wait_event({"X_FDMIG_CHARDEV_STATE", "MIGRATION"}, deadline)
        except TimeoutExpired:
            break
        except (NoInstanceError, FdmigError, EOFError, OSError):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)  # the instance is not up yet, or hands over its control path
    raise TimeoutExpired(f"timed out after {timeout:g} s waiting for {label}={state}: {seen}")


def _channel_path(control_path: str, channel: str | None, defer: bool = False) -> str | None:
    """`--channel unix:PATH`, or next to the control socket: <name>.migrate.sock.
    `defer` (migrate-in only): None, and QMP migrate-incoming names it later."""
    if defer and channel == "defer":
        return None
    if channel is None:
        return paths.channel_beside(control_path)
    from fdmig.migration.channel import parse_uri
    try:
        return parse_uri(channel)
    except ValueError as exc:
        raise SpecError(f"--channel: {exc}") from None


@main.command("migrate-in")
@instance_options
@click.option("--channel", metavar="unix:PATH|defer",
              help="Migration channel (default: <runtime-dir>/<name>.migrate.sock); "
                   "'defer': wait for QMP migrate-incoming on <name>.incoming.sock.")
@click.option("--chardev", "chardev_specs", multiple=True, metavar="SPEC",
              help="A chardev of the target; local-incoming=on: it must arrive live.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Give up (exit 4) if no migration has arrived after S seconds.")
@click.option("--exec", "exec_", is_flag=True, help="After the migration, exec CMD with the fds (systemd socket activation).")
@click.argument("command", nargs=-1, metavar="[-- CMD [ARGS]...]")
def migrate_in(name, control, channel, chardev_specs, timeout, exec_, command):
    """Start a target instance that waits for a migration, then serves (or execs CMD)."""
    control_path = _control_path(name, control)
    channel_path = _channel_path(control_path, channel, defer=True)
    chardevs = _parse_specs(chardev_specs)
    if command and not exec_:
        raise SpecError(f"unexpected argument '{command[0]}'; a command goes after --exec --")
    if exec_:
        import shutil
        if not command:
            raise SpecError("--exec needs a command: --exec -- CMD [ARGS]...")
        if shutil.which(command[0]) is None:
            raise SpecError(f"--exec: command '{command[0]}' not found")
    _prepare_control(control_path)
    if channel_path and os.path.dirname(os.path.abspath(channel_path)) == os.path.abspath(paths.runtime_dir()):
        paths.ensure_private_dir(paths.runtime_dir())
    instance_name = _instance_name(name, control)
    _setup_logging(instance_name)
    from fdmig.daemon import Instance, run_incoming
    instance = Instance(instance_name, control_path, incoming=True)
    sys.exit(run_incoming(instance, channel_path, chardevs, timeout, list(command) if exec_ else None))


@main.command("migrate-out")
@instance_options
@click.option("--channel", metavar="unix:PATH", help="Migration channel (default: <runtime-dir>/<name>.migrate.sock).")
@click.option("--capability", "capabilities", multiple=True, type=click.Choice(["local-char-socket"]),
              help="Enable a capability before migrating.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Bound the whole migration; on expiry the source rolls back (exit 4). Default 60.")
@click.option("--spawn", is_flag=True, help="Start the target (fdmig migrate-in) and migrate to it.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
def migrate_out(name, control, channel, capabilities, timeout, spawn, as_json):
    """Migrate an instance's connections live to a target (migrate-in), then exit."""
    control_path = _control_path(name, control)
    channel_path = _channel_path(control_path, channel)
    from fdmig import migrate_client
    outcome = migrate_client.migrate_out(control_path, channel_path, capabilities, timeout or 60.0,
                                         spawn, (["--name", name] if name else []) +
                                         (["--control", control] if control else []))
    if as_json:
        import json
        click.echo(json.dumps(outcome, indent=2))
    else:
        for line in outcome["notes"]:
            click.echo(line, err=True)
        click.echo(outcome["summary"])


@main.command()
@click.option("--migrations", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="How many live migrations to run.")
def demo(migrations):
    """A self-contained live handoff: an echo chardev, a peer streaming numbered
    records, and several migrations to fresh processes. Exit 1 if anything was lost."""
    from fdmig import demo as demo_module
    sys.exit(demo_module.run(migrations))


if __name__ == "__main__":
    main()
