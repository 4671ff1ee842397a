"""The `bitsmith` command group and what its commands share: one line and an exit status for every failure
(DESIGN.md section 1), reports as text or JSON, options in sections."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading

import click

from .. import __version__
from ..formats.errors import InputError, PeerLost, one_line, signalled


class _Group(click.Group):
    """Turns bad input into one line and exit 2, and unexpected failures into one line and exit 1."""

    def invoke(self, ctx):
        with _terminate_as_interrupt():
            return self._invoke(ctx)

    def _invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as e:
            if not _follower():                     # one line from the main process of a parallel run
                click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except PeerLost as e:
            if not _follower() and "BITSMITH_LAUNCHED" not in os.environ:     # else the launcher says which died
                click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except click.UsageError as e:               # a bad option or argument: one line too
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt as e:              # Ctrl-C, or SIGTERM (Terminated): what was kept, if anything
            signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
            said = "terminated" if signum == signal.SIGTERM else "interrupted"
            if not _follower():
                click.echo(f"{said}: {one_line(e)}" if str(e) else said, err=True)
            sys.exit(128 + signum)
        except BrokenPipeError:                     # `bitsmith inspect OUT | head`: the reader left; stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())     # as `git log | head` does
            sys.exit(128 + signal.SIGPIPE)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                _internal(ctx, e)
            click.echo(f"error: {e.strerror}{f' ({e.filename})' if e.filename else ''}: the output could not be "
                       "written; free some space and run again", err=True)
            sys.exit(2)
        except Exception as e:  # noqa: BLE001 the last line of defence: no traceback for users
            _internal(ctx, e)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the command is, as Ctrl-C raises KeyboardInterrupt: the run stops the same way
    (an unfinished quantize output kept for --resume, any other deleted) and exits 143."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While a command runs, SIGTERM raises Terminated and Ctrl-C KeyboardInterrupt (in the main thread, for each
    signal unless it is ignored), remembered (formats/errors.py) so that a library turning either into an error
    of its own does not make it look like bad input."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise signalled(Terminated())

    def interrupt(signum, frame):
        raise signalled(KeyboardInterrupt())

    handlers = {signal.SIGTERM: terminate, signal.SIGINT: interrupt}
    previous = {signum: signal.getsignal(signum) for signum in handlers}
    for signum, handler in handlers.items():
        if previous[signum] is not signal.SIG_IGN:
            signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:                 # None: installed from outside Python, cannot be put back
                signal.signal(signum, handler)
        signalled(None)


def _follower() -> bool:
    """Whether this is a process other than the main one of a run over several processes (torchrun's RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and os.environ.get("RANK", "0") != "0"


def _internal(ctx, e: Exception):
    """A bug: one line and exit 1, or with --debug the traceback."""
    if ctx.obj and ctx.obj.get("debug"):
        raise e
    where = f"process {os.environ.get('RANK')}: " if _follower() else ""
    click.echo(f"{where}internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)",
               err=True)
    sys.exit(1)


@click.group(cls=_Group)
@click.version_option(__version__, "--version", prog_name="bitsmith", message="%(prog)s %(version)s",
                      help="Show the version and exit.")
@click.option("--debug", is_flag=True, envvar="BITSMITH_DEBUG",
              help="Show tracebacks of internal errors (also with the environment variable BITSMITH_DEBUG=1).")
@click.pass_context
def main(ctx, debug):
    """bitsmith: post-training weight quantization for LLM checkpoints."""
    from ..memory import set_allocator
    set_allocator()
    ctx.obj = {"debug": debug}


def json_option(what: str):
    """`--json FILE`: write `what` as JSON to FILE, or with `-` to stdout in place of the printed report."""
    return click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), metavar="FILE",
                        callback=_json_target,
                        help=f"Write {what} as JSON to FILE ('-': to stdout, instead of the printed report).")


def _json_target(ctx, param, path: str | None) -> str | None:
    """--json FILE is checked before any work: a result that cannot be written at the end is lost."""
    if path is not None and path != "-":
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise InputError(f"--json {path}: the folder {folder} does not exist")
    return path


class Sectioned(click.Command):
    """A command whose --help lists its options in titled sections (`sections`: title -> parameter names, in
    order); options no section names follow under "Other options"."""

    def __init__(self, *args, sections: dict[str, tuple[str, ...]], **kwargs):
        super().__init__(*args, **kwargs)
        self.sections = sections

    def format_options(self, ctx, formatter):
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx) if not isinstance(p, click.Argument)}
        records = {name: r for name, r in records.items() if r is not None}
        placed = [name for names in self.sections.values() for name in names]
        groups = [(title, [records[n] for n in names if n in records]) for title, names in self.sections.items()]
        groups.append(("Other options", [r for n, r in records.items() if n not in placed]))
        width = min(max(len(term) for term, _ in records.values()), 30)     # one column across sections
        for title, rows in groups:
            if rows:
                with formatter.section(title):
                    formatter.write_dl([(term.ljust(width), text) for term, text in rows])


class Report:
    """What a command prints: a report on stdout, and its JSON in a file; with `--json -` only the JSON goes to
    stdout and remarks go to stderr."""

    def __init__(self, json_path: str | None):
        self.json_path = json_path
        self.quiet = json_path == "-"

    def line(self, text: str) -> None:
        """A line of the report (left out when the JSON takes stdout)."""
        if not self.quiet:
            click.echo(text)

    def note(self, text: str) -> None:
        """A remark beside the result."""
        click.echo(text, err=self.quiet)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in rows)
        self.line(title)
        for k, v in rows:
            self.line(f"  {k:<{width}}  {v}")

    def json(self, payload) -> None:
        if self.json_path is None:
            return
        import json
        text = json.dumps(payload, indent=2, default=str) + "\n"
        if self.quiet:
            click.echo(text, nl=False)
            return
        try:
            with open(self.json_path, "w") as f:
                f.write(text)
        except OSError as e:
            raise InputError(f"--json {self.json_path}: cannot write it ({e.strerror})") from None
