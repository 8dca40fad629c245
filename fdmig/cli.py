"""The command line: parse, call the control client, render. Nothing else.

Heavy modules (asyncio, rich, psutil) are imported inside the commands that use
them, so `fdmig --version` and `fdmig status` start fast.
"""

import errno
import os
import re
import sys
import time

import click

from fdmig import __version__, paths, qmp
from fdmig.errors import FdmigError, NoInstanceError, SpecError, TimeoutExpired
from fdmig.lifecycle import RunState
from fdmig.spec import STATES, ChardevSpec, FieldError, check_incoming, check_label, check_set, parse_spec


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"fdmig: {self.format_message()}", err=True)


class OneLineUsage:
    """click's own usage errors (a bad option value, an unknown option) as one line
    on stderr in fdmig's form, exit 2, without click's usage block."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _usage_error(exc, f"{parent.command_path} {info_name}" if parent else info_name) from None


class Command(OneLineUsage, click.Command):
    pass


class Group(OneLineUsage, click.Group):
    """Turns fdmig's exceptions into one line on stderr and their exit code."""

    command_class = Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FdmigError as exc:
            raise CliError(str(exc), exc.exit_code) from None
        except click.UsageError as exc:  # an unknown command
            raise _usage_error(exc, ctx.command_path) from None


def _usage_error(exc: click.UsageError, where: str) -> click.ClickException:
    """`--timeout: 0 is out of range; accepted: a number greater than 0`; where
    click's message cannot say what is accepted, it and where to look."""
    if isinstance(exc, CliError) or type(exc).__name__ == "NoArgsIsHelpError":
        return exc  # made already; or bare `fdmig`, which prints the help
    if isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter) \
            and exc.param is not None:
        param = exc.param
        name = max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name
        return CliError(f"{name}: {_bad_value(exc.message, param.type)}", exc.exit_code)
    if isinstance(exc, click.MissingParameter) and isinstance(getattr(exc.param, "type", None), click.Choice):
        param = exc.param
        name = max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name
        return CliError(f"missing {exc.param_type or 'argument'} {name}; accepted: "
                        f"{', '.join(map(str, param.type.choices))}", exc.exit_code)
    # click's "no such option '--jsn'. Did you mean '--json'?" as one clause.
    # (click 8.1 writes it without the full stop.)
    message = re.sub(r"\.?\s+Did you mean (.*)\?$", r" (did you mean \1?)", exc.format_message().strip())
    message = message.rstrip(".")
    if exc.ctx is not None:
        where = exc.ctx.command_path
    return CliError(f"{message[:1].lower()}{message[1:]}; see '{where} --help'", exc.exit_code)


def _bad_value(message: str, kind) -> str:
    """click's complaint about a value in the words of a SpecError: what is wrong
    with it and what is accepted."""
    given = re.match(r"(.*?) is not (?:in the range|a valid|one of|')", message)
    value = given.group(1) if given else None
    if isinstance(kind, click.Choice):
        return f"{value or 'the value'} is not known; accepted: {', '.join(map(str, kind.choices))}"
    if isinstance(kind, (click.IntRange, click.FloatRange)):
        number = "a whole number" if isinstance(kind, click.IntRange) else "a number"
        if kind.min is not None and kind.max is not None and not (kind.min_open or kind.max_open):
            accepted = f"{kind.min} to {kind.max}"
        elif kind.max is None and kind.min is not None:
            accepted = f"{number} greater than {kind.min:g}" if kind.min_open else f"{number}, {kind.min:g} or more"
        else:
            accepted = kind._describe_range()
        if value is None:
            return f"{message.rstrip('.')}; accepted: {accepted}"
        if "is not in the range" not in message:
            return f"{value} is not {number}; accepted: {accepted}"
        try:
            value = f"{float(value):g}"  # click says 0.0 for the 0 given
        except ValueError:
            pass
        return f"{value} is out of range; accepted: {accepted}"
    return message.rstrip(".")


def _complete_names(ctx, param, incomplete):
    """The names of the instances that answer now (a short timeout each, asked all
    at once): not those a killed instance left a stale socket for."""
    from fdmig import listing
    return [n for n in listing.answering_names() if n.startswith(incomplete)]


def _complete_labels(ctx, param, incomplete):
    try:
        with qmp.connect(_control_path(ctx.params.get("name"), ctx.params.get("control")), timeout=1) as client:
            labels = [c["label"] for c in client.execute("query-chardev")]
    except Exception:
        return []
    if param.name == "wait":
        if "=" in incomplete:
            label, _, part = incomplete.partition("=")
            return [f"{label}={s}" for s in STATES if s.startswith(part)]
        return [f"{label}=" for label in labels if label.startswith(incomplete)]
    return [label for label in labels if label.startswith(incomplete)]


def _complete_spec(ctx, param, incomplete):
    """A SPEC: its first word (a backend, then ','), then the keys that backend
    takes, each with its '='. A value is the user's: nothing is offered for it."""
    from fdmig import spec
    if "," not in incomplete:
        return [f"{backend}," for backend in (*spec.BACKENDS, "tty") if backend.startswith(incomplete)]
    done, _, part = incomplete.rpartition(",")
    if "=" in part:
        return []
    keys = [key for key in spec.keys_of(done.split(",")[0])
            if key != "local-incoming" or ctx.info_name == "migrate-in"]  # only a target waits for one
    return [f"{done},{key}=" for key in keys if key.startswith(part) and f",{key}=" not in f",{done}"]


def _complete_program(ctx, param, incomplete):
    """After `--`: a program and its arguments, completed as the shell completes paths."""
    from click.shell_completion import CompletionItem
    return [CompletionItem(incomplete, type="file")]


def instance_options(func):
    func = click.option("--control", metavar="PATH",
                        help="Control socket path (default: NAME.sock in the runtime dir).")(func)
    func = click.option("--name", "-n", metavar="NAME", shell_complete=_complete_names,
                        help="Instance name (default: 'default').")(func)
    return func


CAPABILITIES = ["local-char-socket", "x-tcp-repair"]
CHARDEV_HELP = ("A chardev, in QEMU's -chardev syntax: socket,id=LABEL, then path=P or host=H,port=N (or "
                "fd=N, fdname=NAME), and server=on, support-local-migration=on, frontend=... as needed; "
                "or pty,id=L, serial,id=L,path=DEV, pipe,id=L,path=P, udp,id=L,host=H,port=N, "
                "file,id=L,path=P (man fdmig).")
capability_option = click.option("--capability", "capabilities", multiple=True,
                                 type=click.Choice(CAPABILITIES), help="Enable a migration capability.")
fdstore_option = click.option("--fdstore", "fdstore", is_flag=True,
                              help="Keep each chardev's fds in this instance's own manager's fd store, "
                                   "and adopt them back at start.")


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
    """The --chardev SPECs; an error names its chardev: by id=, or by its place
    among several when it has no valid id."""
    chardevs = []
    for number, text in enumerate(texts, 1):
        try:
            chardevs.append(parse_spec(text))
        except FieldError as exc:
            raise exc.naming(f"#{number}" if len(texts) > 1 else None) from None
    check_set(chardevs)
    return chardevs


def _no_service(chardevs, command: str) -> None:
    """frontend=service belongs to `fdmig run`, whose service the fd is passed to."""
    for spec in chardevs:
        if spec.frontend == "service":
            raise FieldError("frontend", f"frontend=service passes the fd to the service of fdmig run; "
                                         f"not accepted by {command} (accepted: hold, echo, sink, bridge)", spec.id)


def _setup_logging(name: str) -> None:
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"fdmig[{name}]: %(message)s")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="fdmig")
def main():
    """Hand live socket connections from one process to another.

    An instance holds sockets (chardevs, in QEMU's -chardev syntax) and answers
    QMP on a control socket. `fdmig run` keeps a program's sockets across its
    restarts; migrate-out moves an instance's connections live to a new
    process: the peers see a pause, never a reconnect. man fdmig tells more.

    \b
    Examples:
      fdmig demo
      fdmig run --notify --chardev id=web,host=::,port=80,server=on -- ./app.py
      fdmig restart
    """


@main.command()
@instance_options
@click.option("--chardev", "chardev_specs", multiple=True, metavar="SPEC", shell_complete=_complete_spec,
              help=CHARDEV_HELP)
@capability_option
@fdstore_option
def serve(name, control, chardev_specs, capabilities, fdstore):
    """Run an instance holding the given chardevs.

    It serves until fdmig stop, SIGTERM, SIGINT or SIGHUP, which stop it
    cleanly, or until it migrates away (fdmig migrate-out).

    \b
    Examples:
      fdmig serve --capability local-char-socket --chardev \\
        id=app,path=/tmp/a.sock,server=on,frontend=echo,support-local-migration=on
      fdmig serve --name proxy \\
        --chardev id=front,host=0.0.0.0,port=2323,server=on,bridge=back \\
        --chardev id=back,host=192.0.2.7,port=23,reconnect-ms=500
    """
    control_path = _control_path(name, control)
    chardevs = _parse_specs(chardev_specs)
    _no_service(chardevs, "fdmig serve")
    for spec in chardevs:
        check_incoming(spec, incoming=False)
    _prepare_control(control_path)
    _check_free(chardevs)
    instance_name = _instance_name(name, control)
    _setup_logging(instance_name)
    from fdmig.daemon import Instance, run
    instance = Instance(instance_name, control_path, capabilities, fdstore=fdstore)
    sys.exit(run(instance, chardevs))


@main.command(context_settings={"allow_interspersed_args": False})
@instance_options
@click.option("--chardev", "chardev_specs", multiple=True, metavar="SPEC", shell_complete=_complete_spec,
              help="A chardev; its fd goes to the service (frontend=service, the default here).")
@capability_option
@click.option("--notify", "notify_ready", is_flag=True,
              help="The service is ready when it sends READY=1 (systemd's Type=notify).")
@click.option("--fdstore-max", type=click.IntRange(min=0), default=1024, show_default=True, metavar="N",
              help="How many fds the service may store (FDSTORE=1); 0 turns the store off.")
@click.option("--restart", "restart_policy", type=click.Choice(["no", "on-failure", "always"]), default="no",
              show_default=True, help="Start the service again when it exits by itself.")
@click.option("--stop-signal", default="SIGTERM", show_default=True, metavar="SIG",
              help="The signal that stops the service (a name or a number).")
@click.option("--timeout", "stop_timeout", type=click.FloatRange(min=0, min_open=True), default=90.0,
              show_default=True, metavar="S", help="How long a stopping (or draining) service has before SIGKILL.")
@click.option("--overlap", is_flag=True,
              help="Restart as Server::Starter does: the new service starts beside the old one, which drains "
                   "once the new one is ready (for servers that drain on their stop signal).")
@click.option("--ready-delay", type=click.FloatRange(min=0), default=None, metavar="S",
              help="With --overlap: a new service alive this long (after its READY=1, with --notify) is ready "
                   "(default 1 s; 0 with --notify).")
@fdstore_option
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]...", shell_complete=_complete_program)
def run(name, control, chardev_specs, capabilities, notify_ready, fdstore_max, restart_policy, stop_signal,
        stop_timeout, overlap, ready_delay, fdstore, command):
    """Run a program that keeps its sockets across its own restarts.

    CMD gets the chardevs' sockets from fd 3 on (systemd's socket activation:
    LISTEN_FDS, LISTEN_FDNAMES) and a NOTIFY_SOCKET whose fd store (FDSTORE=1)
    keeps what it stores; fdmig restart starts it again with all of them.

    \b
    Examples:
      fdmig run --name web --notify \\
        --chardev id=http,host=0.0.0.0,port=8080,server=on -- ./server.py
      fdmig run --restart on-failure \\
        --chardev id=sock,path=/run/app.sock,server=on -- app --serve
    """
    from fdmig.service import Options, parse_signal
    control_path = _control_path(name, control)
    parsed = _parse_specs(chardev_specs)
    bridged = {spec.bridge for spec in parsed if spec.bridge}
    chardevs = [spec if spec.id in bridged else _service_by_default(spec, text)
                for spec, text in zip(parsed, chardev_specs)]
    for spec in chardevs:
        check_incoming(spec, incoming=False)
    try:
        signum = parse_signal(stop_signal)
    except ValueError as exc:
        raise SpecError(f"--stop-signal: {exc}") from None
    _check_command(command[0], "command")
    _prepare_control(control_path)
    _check_free(chardevs)
    instance_name = _instance_name(name, control)
    _setup_logging(instance_name)
    from fdmig.daemon import Instance, run_with_service
    instance = Instance(instance_name, control_path, capabilities, fdstore=fdstore)
    if ready_delay is not None and not overlap:
        raise SpecError("--ready-delay goes with --overlap: without it, a restart starts the new service only "
                        "once the old one has exited")
    if ready_delay is None:
        ready_delay = 0.0 if notify_ready else 1.0
    options = Options(notify_ready, restart_policy, signum, stop_timeout, fdstore_max, overlap, ready_delay)
    sys.exit(run_with_service(instance, chardevs, list(command), options))


def _check_free(chardevs, own_name: str | None = None) -> None:
    from fdmig import instances  # asks every instance: only for the commands that listen
    instances.check_free(chardevs, own_name)


def _check_command(program: str, what: str) -> None:
    """SpecError unless `program` is one that can be run: why not, and what would."""
    import shutil
    if shutil.which(program) is not None:
        return
    if "/" not in program:
        raise SpecError(f"{what} '{program}' not found on PATH; accepted: a program on PATH, or a path to one")
    if os.path.isdir(program):
        raise SpecError(f"{what} '{program}' is a directory; accepted: a program")
    if os.path.exists(program):
        raise SpecError(f"{what} '{program}' is not executable: chmod +x {program}, or name its "
                        f"interpreter first (-- python3 {program})")
    raise SpecError(f"{what} '{program}' not found; accepted: a program on PATH, or a path to one")


def _service_by_default(spec: ChardevSpec, text: str) -> ChardevSpec:
    """In `run`, a chardev's frontend is `service` unless its SPEC says otherwise
    (or a bridge relays to it: then it is the bridge's)."""
    if spec.frontend != "hold" or re.search(r"(^|,)frontend=", text):
        return spec
    return ChardevSpec(**{**spec.__dict__, "frontend": "service"})


# Beyond restart's and stop's --timeout: how long the instance has to answer at all.
ANSWER_GRACE = 10.0


@main.command()
@instance_options
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=90.0, show_default=True,
              metavar="S", help="Give up after S seconds, whatever is awaited: the old service's stop or the "
                                "new one's readiness (exit 4); the restart goes on in the instance.")
def restart(name, control, timeout):
    """Restart the service of a `run` instance.

    The old service gets its stop signal (SIGKILL after run --timeout), the new
    one starts with every listening socket and stored fd, held throughout. Exit
    0 once it is ready; 1 if it exited first or could not be started (with its
    exit status and last line of stderr); 4 at --timeout, the restart going on
    in the instance.

    \b
    Examples:
      fdmig restart --name web
      fdmig restart --name web --timeout 30 || fdmig status --name web
    """
    control_path = _control_path(name, control)
    try:
        with qmp.connect(control_path, timeout=timeout + ANSWER_GRACE) as client:
            outcome = client.execute("x-fdmig-restart", {"timeout": timeout})
    except KeyboardInterrupt:
        raise FdmigError(f"interrupted; {_restart_state(control_path)}") from None
    if outcome["status"] == "ready":
        click.echo(f"service restarted: pid {outcome['pid']}, ready")
        _exit_at_once()
        return
    if outcome["status"] == "timeout":
        goes_on = "; the restart goes on in the instance" if outcome.get("goes-on", True) else ""
        raise TimeoutExpired(f"timed out after {timeout:g} s: {outcome['error']}{goes_on}")
    if outcome.get("old-serves"):  # --overlap: nothing changed
        raise FdmigError(f"restart failed: {outcome['error']}; fix it and run fdmig restart again")
    raise FdmigError(f"the service did not come back: {outcome['error']}; its listening sockets and fd store "
                     "stay held: fix it and run fdmig restart again")


def _exit_at_once() -> None:
    """Exit 0 now, without the interpreter's teardown: with --overlap, restart
    returns as the old generation begins to drain and the new one takes every
    request, and tearing down a Python process is CPU they would share."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        os._exit(120)  # as the interpreter does when what it said cannot be written
    os._exit(0)


def _restart_state(control_path: str) -> str:
    """Where a restart stands that this command no longer waits for."""
    from fdmig import render
    try:
        with qmp.connect(control_path, timeout=2) as client:
            service = client.execute("x-fdmig-status").get("service") or {}
    except (FdmigError, OSError):
        return "the restart goes on in the instance, which does not answer just now"
    pid, state = service.get("pid"), service.get("state")
    if state == "stopping":
        kill = f"; SIGKILL at {render.local_time(service['kill-at'])}" if service.get("kill-at") else ""
        return f"the restart goes on in the instance: the old service (pid {pid}) is stopping{kill}"
    if state in ("restarting", "starting"):
        return f"the restart goes on in the instance: the new service (pid {pid}) is starting, not ready yet"
    if state == "running":
        return f"the service (pid {pid}) is running and ready"
    return f"the service is {state}: fdmig status shows why"


@main.command()
@instance_options
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              metavar="S", help="How long to wait for the instance to exit (exit 4 after; it goes on stopping).")
def stop(name, control, timeout):
    """Stop an instance cleanly (QMP quit).

    The instance stops as on SIGTERM: a `run` instance stops its service first
    (SIGKILL after its run --timeout), and every socket file of the instance is
    removed; a migration target still waiting (migrate-in) stops too. Exit 0
    once the instance's process has exited, 3 if no instance answers, 4 at
    --timeout (the instance goes on stopping).

    \b
    Examples:
      fdmig stop --name web
      fdmig stop --control /run/app/fdmig.sock --timeout 10
    """
    from fdmig import listing
    stopped = listing.stop(_control_path(name, control), timeout)
    click.echo(f"stopped instance {stopped['name']} (pid {stopped['pid']})")


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the instances as one JSON array.")
def list_instances(as_json):
    """List the instances in the runtime dir.

    One row each: name, pid, state, chardevs (a count), control socket. A
    control socket nobody listens on (an instance killed outright left it) is
    stale, with no pid: the next serve of that name replaces it; one whose
    process does not answer within 2 s is unresponsive. A migration target
    still waiting (migrate-in) shows state inmigrate.

    \b
    Examples:
      fdmig list
      fdmig list --json | jq -r '.[] | select(.state == "stale") | .name'
    """
    from fdmig import listing
    rows = listing.find()
    if as_json:
        import json
        click.echo(json.dumps(rows, indent=2))
    elif sys.stdout.isatty():
        from rich.console import Console
        if rows:
            Console().print(listing.rich_table(rows))
        else:
            Console().print(f"no instance in {paths.runtime_dir()}")
    elif rows:
        click.echo(listing.plain(rows))  # in a pipe one row per line, for grep and awk


@main.command()
@instance_options
@click.argument("spec", metavar="SPEC", shell_complete=_complete_spec)
def attach(name, control, spec):
    """Add a chardev to a running instance (QMP chardev-add).

    With fd=N, this command's own descriptor N is passed to the instance.

    SPEC is QEMU's -chardev syntax: a socket (the first word may be left out),
    or pty, serial, pipe, udp, file (man fdmig).

    \b
    Examples:
      fdmig attach --name web id=admin,path=/tmp/adm.sock,server=on,frontend=echo
      fdmig attach --name web id=up,host=192.0.2.7,port=5000,reconnect-ms=500
      fdmig attach --name console pty,id=con2,support-local-migration=on
    """
    chardev = parse_spec(spec)
    _no_service([chardev], "fdmig attach")
    with qmp.connect(_control_path(name, control)) as client:
        status = client.execute("x-fdmig-status")
        _check_against(chardev, status)
        _check_free([chardev], own_name=status["name"])
        if chardev.fd_is_number:
            fd = int(chardev.fd)
            _check_own_fd(fd, chardev)
            passed_name = f"attach-{chardev.id}"
            client.execute("getfd", {"fdname": passed_name}, fds=(fd,))
            chardev = ChardevSpec(**{**chardev.__dict__, "fd": passed_name})
        try:
            client.execute("chardev-add", chardev.to_qmp())
        except FdmigError as exc:
            if chardev.kind == "fd" and chardev.fd.startswith("attach-"):
                try:
                    client.execute("closefd", {"fdname": chardev.fd})  # do not leave our fd behind
                except FdmigError:
                    pass  # the instance had taken it already, and closed it
            # Another client may have taken the label or the address since we
            # looked: that is still a SPEC that does not fit (exit 2), not a failure;
            # so is an address some other program holds (QMP says it in words only).
            _check_against(chardev, client.execute("x-fdmig-status"))
            if os.strerror(errno.EADDRINUSE) in str(exc):
                raise SpecError(str(exc)) from None
            raise
        row = next((c for c in client.execute("x-fdmig-status")["chardevs"] if c["label"] == chardev.id), {})
    address = row.get("address", chardev.address)  # a pty's, as the kernel named it
    described = f"{chardev.role} {address}" if chardev.role else address
    click.echo(f"attached {chardev.id}: {described} ({row.get('state', '?')})")


def _check_against(chardev: ChardevSpec, status: dict) -> None:
    """The SPEC rules that depend on what the instance holds, checked here so that
    a bad SPEC exits 2 whether the mistake is in it alone or in how it fits."""
    from fdmig.spec import Addresses, check_fits
    held = {c["label"]: parse_spec(c["spec"]) for c in status["chardevs"]}
    try:  # relative paths are the instance's, relative to its working directory
        cwd = os.readlink(f"/proc/{status['pid']}/cwd")
    except OSError:
        cwd = ""  # unknown: relative paths are compared as written
    addresses = Addresses(cwd)
    for other in held.values():
        addresses.add(other)
    check_fits(chardev, held, incoming=status["state"] == RunState.INMIGRATE.value, addresses=addresses)


def _check_own_fd(fd: int, chardev: ChardevSpec) -> None:
    """fd=N is this command's descriptor N, checked here as the instance would
    check it, so that a message names N and not the number the instance gets."""
    from fdmig import fdcheck
    try:
        os.fstat(fd)
    except OSError:
        raise FieldError("fd", f"{fd} is not an open descriptor of this command", chardev.id) from None
    fdcheck.stream_socket(fd, chardev, chardev.id).detach()


@main.command()
@instance_options
@click.argument("label", shell_complete=_complete_labels)
def detach(name, control, label):
    """Remove a chardev from an instance (QMP chardev-remove).

    Its peer sees EOF; a listening chardev's socket file is removed.

    \b
    Example:
      fdmig detach --name web admin
    """
    with qmp.connect(_control_path(name, control)) as client:
        client.execute("chardev-remove", {"id": label})
    click.echo(f"detached {label}")


def _parse_wait(value: str) -> tuple[str, str]:
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
    """Show an instance: chardevs, peers, counters, migration.

    A table on a terminal, one line per chardev in a pipe, one JSON object
    with --json; --wait LABEL=STATE waits for a chardev's state (exit 4 at
    --timeout), for scripts.

    \b
    Examples:
      fdmig status --name web
      fdmig status --name web --json | jq '.chardevs[] | {label, state}'
      fdmig status --name web --wait app=connected --timeout 10
    """
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
    _print_status(_fetch_status(control_path), as_json)


def _fetch_status(control_path: str) -> dict:
    """x-fdmig-status of the instance at `control_path`; while no instance serves
    there but a migration target waits to take it (migrate-in), the target's
    (state inmigrate), from where it answers meanwhile: <name>.incoming.sock."""
    try:
        with qmp.connect(control_path) as client:
            return client.execute("x-fdmig-status")
    except NoInstanceError as exc:
        try:
            with qmp.connect(paths.incoming_beside(control_path)) as client:
                return client.execute("x-fdmig-status")
        except FdmigError:
            raise exc from None


def _print_status(data: dict, as_json: bool) -> None:
    from fdmig import render
    if as_json:
        click.echo(render.as_json(data))
    elif sys.stdout.isatty():
        from rich.console import Console
        Console().print(render.rich_table(data))
    else:
        click.echo(render.plain(data))  # in a pipe one row per line, for grep and awk


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
                data = _fetch_status(control_path)
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
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends, as watch(1) and top(1) end: exit 0, quietly
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


def _channel(control_path: str, channel: str | None, tls_creds: str | None, role: str, defer: bool = False):
    """`--channel unix:PATH|tcp:HOST:PORT` (a paths.ChannelAddress), or next to the
    control socket: <name>.migrate.sock. `defer` (migrate-in only): None, and QMP
    migrate-incoming names it later. A TCP channel needs --tls-creds; only it may."""
    if defer and channel == "defer":
        address = None
    elif channel is None:
        address = paths.ChannelAddress(path=paths.channel_beside(control_path))
    else:
        try:
            address = paths.parse_channel_uri(channel)
        except ValueError as exc:
            raise SpecError(f"--channel: {exc}") from None
    if address is not None and address.tcp and tls_creds is None:
        raise SpecError(f"--channel {channel}: a TCP channel needs --tls-creds DIR (there is no plaintext "
                        "channel); without TLS, a unix channel is needed: unix:PATH")
    if address is not None and not address.tcp and tls_creds is not None:
        raise SpecError("--tls-creds is for a TCP channel (--channel tcp:HOST:PORT); a unix channel is "
                        "checked by its peer's uid instead")
    if tls_creds is not None:
        from fdmig import tlscreds  # ssl: only for a TCP channel
        tlscreds.check(tls_creds, role)
    return address


def _hooks(tls_creds: str | None, **given) -> dict:
    """The shell commands that move the service address between hosts, by role;
    only for a TCP channel (one with --tls-creds)."""
    hooks = {role: command for role, (_, command) in given.items() if command is not None}
    for role, (option, command) in given.items():
        if command is not None and not command.strip():
            raise SpecError(f"{option}: an empty command; give a shell command line")
        if command is not None and tls_creds is None:
            raise SpecError(f"{option} moves the service address to another host: it is for a TCP channel "
                            "(--channel tcp:HOST:PORT --tls-creds DIR)")
    return hooks


tls_creds_option = click.option("--tls-creds", metavar="DIR",
                                help="The directory of a TCP channel's TLS certificates and keys, laid "
                                     "out as QEMU's are (see man fdmig-migrate-out).")


@main.command("migrate-in")
@instance_options
@click.option("--channel", metavar="unix:PATH|tcp:HOST:PORT|defer",
              help="Migration channel (default: NAME.migrate.sock in the runtime dir); "
                   "'defer': wait for QMP migrate-incoming on <name>.incoming.sock.")
@tls_creds_option
@click.option("--chardev", "chardev_specs", multiple=True, metavar="SPEC", shell_complete=_complete_spec,
              help="A chardev of the target; local-incoming=on: it must arrive live.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Give up (exit 4) if no migration has arrived after S seconds.")
@click.option("--exec", "exec_", is_flag=True, help="After the migration, exec CMD with the fds (systemd socket activation).")
@fdstore_option
@click.option("--claim-cmd", metavar="CMD",
              help="TCP channel: a shell command that brings the service address here, run before the "
                   "moved connections resume; its failure rolls the migration back.")
@click.option("--release-cmd", metavar="CMD",
              help="TCP channel: a shell command that gives the address up again, run if the migration "
                   "fails after --claim-cmd ran.")
@click.argument("command", nargs=-1, metavar="[-- CMD [ARGS]...]", shell_complete=_complete_program)
def migrate_in(name, control, channel, tls_creds, chardev_specs, timeout, exec_, fdstore, claim_cmd, release_cmd,
               command):
    """Start a target that waits for a migration, then serves.

    It takes the source's chardevs live over the channel and then serves as
    `serve` would, under the same name and control socket; with --exec, it
    execs CMD with them instead (systemd's socket activation).

    \b
    Examples:
      fdmig migrate-in --name web
      fdmig migrate-in --name web --exec -- ./server.py
    """
    control_path = _control_path(name, control)
    address = _channel(control_path, channel, tls_creds, "server", defer=True)
    hooks = _hooks(tls_creds, claim=("--claim-cmd", claim_cmd), release=("--release-cmd", release_cmd))
    chardevs = _parse_specs(chardev_specs)
    _no_service(chardevs, "fdmig migrate-in")
    if command and not exec_:
        raise SpecError(f"unexpected argument '{command[0]}'; a command goes after --exec --")
    if exec_:
        if not command:
            raise SpecError("--exec needs a command: --exec -- CMD [ARGS]...")
        _check_command(command[0], "--exec: command")
    _prepare_control(control_path)
    _check_free(chardevs, own_name=_instance_name(name, control))
    if address and not address.tcp and \
            os.path.dirname(os.path.abspath(address.path)) == os.path.abspath(paths.runtime_dir()):
        paths.ensure_private_dir(paths.runtime_dir())
    instance_name = _instance_name(name, control)
    _setup_logging(instance_name)
    from fdmig.daemon import Instance, run_incoming
    instance = Instance(instance_name, control_path, incoming=True, fdstore=fdstore)
    instance.tls_creds = tls_creds
    instance.hooks = hooks
    sys.exit(run_incoming(instance, address, chardevs, timeout, list(command) if exec_ else None))


@main.command("migrate-out")
@instance_options
@click.option("--channel", metavar="unix:PATH|tcp:HOST:PORT",
              help="Migration channel (default: NAME.migrate.sock in the runtime dir).")
@tls_creds_option
@click.option("--capability", "capabilities", multiple=True, type=click.Choice(CAPABILITIES),
              help="Enable a capability before migrating.")
@click.option("--release-cmd", metavar="CMD",
              help="TCP channel: a shell command that makes this host stop answering the service address, "
                   "run once nothing is read and before the TCP state is dumped.")
@click.option("--reclaim-cmd", metavar="CMD",
              help="TCP channel: a shell command that takes the address back, run if the migration fails "
                   "after --release-cmd ran.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Bound the whole migration; on expiry the source rolls back (exit 4). Default 60.")
@click.option("--spawn", is_flag=True, help="Start the target (fdmig migrate-in) and migrate to it.")
@click.option("--reconnect", is_flag=True,
              help="Let the peers of marked chardevs that cannot move live reconnect at the target "
                   "(QEMU's remote migration), instead of refusing the migration.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
def migrate_out(name, control, channel, tls_creds, capabilities, release_cmd, reclaim_cmd, timeout, spawn,
                reconnect, as_json):
    """Move an instance's connections live to a new process.

    The target is a `fdmig migrate-in` of the same name, or one that --spawn
    starts (the upgrade in one command). Exit 0 once the target serves and the
    source has exited; 1 with the reason if it failed, the source serving on;
    4 at --timeout.

    \b
    Examples:
      fdmig migrate-out --name web --spawn
      fdmig migrate-out --name web --capability local-char-socket --spawn --json
    """
    control_path = _control_path(name, control)
    address = _channel(control_path, channel, tls_creds, "client")
    hooks = _hooks(tls_creds, release=("--release-cmd", release_cmd), reclaim=("--reclaim-cmd", reclaim_cmd))
    if spawn and tls_creds is not None:
        from fdmig import tlscreds
        tlscreds.check(tls_creds, "server")  # the spawned target is the server
    from fdmig import migrate_client
    announce = (lambda line: click.echo(f"fdmig: {line}", err=True)) if sys.stderr.isatty() else None
    outcome = migrate_client.migrate_out(control_path, address, capabilities, timeout or 60.0,
                                         spawn, (["--name", name] if name else []) +
                                         (["--control", control] if control else []), announce, tls_creds, hooks,
                                         reconnect)
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
    """Show a live handoff through several migrations.

    An echo chardev, a peer streaming numbered records, and several
    migrations to fresh processes, with what the peer saw. Exit 1 if
    anything was lost.

    \b
    Example:
      fdmig demo --migrations 10
    """
    from fdmig import demo as demo_module
    sys.exit(demo_module.run(migrations))


_FISH_SOURCE = """\
function %(complete_func)s;
    set -l response (env %(complete_var)s=fish_complete COMP_WORDS=(commandline -cp) \
COMP_CWORD=(commandline -t) %(prog_name)s);

    for completion in $response;
        set -l metadata (string split -m 1 "," $completion);

        if test $metadata[1] = "dir";
            __fish_complete_directories $metadata[2];
        else if test $metadata[1] = "file";
            __fish_complete_path $metadata[2];
        else if test $metadata[1] = "plain";
            echo $metadata[2];
        end;
    end;
end;

complete --no-files --command %(prog_name)s --arguments "(%(complete_func)s)";
"""


def _mend_fish_completion() -> None:
    """click 8.4.0 and 8.4.1 write a fish script that fish cannot parse (an unquoted
    `string split \\n`) and answer in three lines per item, which fish's command
    substitution cannot tell apart (pallets/click#3502). With those, fdmig speaks
    what click 8.4.2 went back to: its script, and `TYPE,VALUE<TAB>HELP` per item."""
    from click.shell_completion import FishComplete, add_completion_class

    if "string split \n" not in FishComplete.source_template:
        return

    class MendedFishComplete(FishComplete):
        source_template = _FISH_SOURCE

        def format_completion(self, item) -> str:
            if item.help:
                return f"{item.type},{item.value}\t{' '.join(item.help.split())}"
            return f"{item.type},{item.value}"

    add_completion_class(MendedFishComplete, "fish")


_BASH_SOURCE = """\
%(complete_func)s() {
    local IFS=$'\\n'
    local response completion type value

    response=$(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD COMP_LINE="${COMP_LINE:0:COMP_POINT}" \
COMP_CUR="${COMP_WORDS[COMP_CWORD]}" %(complete_var)s=bash_complete $1)

    for completion in $response; do
        type=${completion%%%%,*}
        value=${completion#*,}
        if [[ $type == 'dir' ]]; then
            COMPREPLY=()
            compopt -o dirnames
        elif [[ $type == 'file' ]]; then
            COMPREPLY=()
            compopt -o default
        elif [[ $type == 'plain' ]]; then
            COMPREPLY+=("$value")
            [[ $value == *[=,] ]] && compopt -o nospace 2>/dev/null
        fi
    done

    return 0
}

%(complete_func)s_setup() {
    complete -o nosort -F %(complete_func)s %(prog_name)s
}

%(complete_func)s_setup;
"""


def _bash_completion() -> None:
    """click's bash script: bash splits the word under the cursor at '='
    (COMP_WORDBREAKS), so click, given COMP_WORDS, saw `socket,id=app,pa` as three
    words and completed nothing past a SPEC's first key; and it read `socket,`
    back as `socket`. fdmig's script also passes the line up to the cursor and
    bash's own current word: the whole shell word is completed from the line and
    answered as bash replaces it, from its last break on; a key's `=` or a
    backend's `,` is left for the next word to follow, with no space."""
    from click.shell_completion import BashComplete, add_completion_class, split_arg_string

    class LineBashComplete(BashComplete):
        source_template = _BASH_SOURCE
        _before = ""  # what of the shell word precedes bash's current word (its last break)

        def get_completion_args(self):
            line = os.environ.get("COMP_LINE")
            if line is None:
                return super().get_completion_args()
            words = split_arg_string(line)
            if not line or line[-1].isspace():
                words.append("")
            current = os.environ.get("COMP_CUR", words[-1])
            self._before = words[-1][:len(words[-1]) - len(current)] if words[-1].endswith(current) else ""
            return words[1:-1], words[-1]

        def format_completion(self, item) -> str:
            value = item.value
            if self._before and item.type == "plain" and value.startswith(self._before):
                value = value[len(self._before):]
            return f"{item.type},{value}"

    add_completion_class(LineBashComplete, "bash")


_COMPLETING = os.environ.get("_FDMIG_COMPLETE", "")
if _COMPLETING.startswith("fish"):
    _mend_fish_completion()  # a completion request from fish; no other start pays for it
elif _COMPLETING.startswith("bash"):
    _bash_completion()


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]), metavar="SHELL")
def completion(shell):
    """Print the shell completion script (bash, zsh or fish).

    The script matches this fdmig and the click it runs on. Load it at shell
    start.

    \b
    Examples:
      eval "$(fdmig completion bash)"       # in ~/.bashrc
      eval "$(fdmig completion zsh)"        # in ~/.zshrc, after compinit
      fdmig completion fish | source        # in ~/.config/fish/config.fish
    """
    from click.shell_completion import get_completion_class
    if shell == "fish":
        _mend_fish_completion()
    elif shell == "bash":
        _bash_completion()
    script = get_completion_class(shell)(main, {}, "fdmig", "_FDMIG_COMPLETE").source()
    click.echo(script, nl=not script.endswith("\n"))


if __name__ == "__main__":
    main()
