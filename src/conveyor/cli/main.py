"""The ``conveyor`` command: the root group, its subcommands, and one-line error reporting."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
from click.core import ParameterSource

from conveyor import __version__
from conveyor.cli.common import CliState, broker_option
from conveyor.cli.dead_letters import dead_letters
from conveyor.cli.enqueue import enqueue
from conveyor.cli.jobs import jobs
from conveyor.cli.queues import purge, queues
from conveyor.cli.serve import serve
from conveyor.cli.worker import worker
from conveyor.errors import ConveyorError

#: Exit code for a usage error (bad option or argument), as click and most Unix tools use.
USAGE_EXIT = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@broker_option
@click.version_option(__version__, prog_name="conveyor")
@click.pass_context
def cli(ctx: click.Context, broker_url: str) -> None:
    """conveyor: run workers, enqueue jobs and inspect queues."""
    typed = ctx.get_parameter_source("broker_url") is ParameterSource.COMMANDLINE
    ctx.obj = CliState(broker_url=broker_url, broker_from_command_line=typed)


cli.add_command(worker)
cli.add_command(enqueue)
cli.add_command(jobs)
cli.add_command(queues)
cli.add_command(purge)
cli.add_command(dead_letters)
cli.add_command(serve)


def _conveyor_error(exc: BaseException) -> ConveyorError | None:
    """The ConveyorError behind ``exc``: itself, or the first one inside an exception group.

    Task groups (the worker's, for instance) wrap what their children raised.
    """
    if isinstance(exc, ConveyorError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _conveyor_error(inner)
            if found is not None:
                return found
    return None


def _fail(message: str, code: int) -> None:
    # One line, no traceback: the message of every conveyor error already says what to do.
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``conveyor`` script: run the CLI and turn errors into exit codes.

    A conveyor error prints one line on stderr and exits 1; a usage error exits 2.
    """
    try:
        result = cli.main(args=argv, prog_name="conveyor", standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(exc.format_message() + hint, USAGE_EXIT)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            sys.exit(130)  # Ctrl-C (e.g. ending `jobs logs --follow`) is not an error to report
        _fail("aborted", 1)
    except (Exception, BaseExceptionGroup) as exc:
        error = _conveyor_error(exc)
        if error is None:
            raise  # a bug, or an exception from user code: the traceback is what helps
        _fail(error.message or type(error).__name__, 1)
    # standalone_mode=False returns a command's exit code (ctx.exit) or its return value.
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
