"""fdmig's exceptions carry their exit code, as click's ClickException does."""


class FdmigError(Exception):
    """The operation failed; nothing was lost. Exit code 1."""

    exit_code = 1


class SpecError(FdmigError):
    """A SPEC or an argument is wrong: the message names the field and what is accepted."""

    exit_code = 2


class NoInstanceError(FdmigError):
    """Nothing answers at the control path."""

    exit_code = 3


class TimeoutExpired(FdmigError):
    exit_code = 4


class QMPError(FdmigError):
    """An error reply from the instance: class and desc as QMP sends them."""

    def __init__(self, error_class: str, desc: str):
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc
