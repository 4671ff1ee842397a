"""The `bitsmith` command line: parse, call the API, report. Errors follow DESIGN.md section 1."""
from __future__ import annotations

import sys

import click

from ..formats.errors import InputError


class _Group(click.Group):
    """Turns bad input into one line and exit 2, and unexpected failures into one line and exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback for users
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.pass_context
def main(ctx, debug):
    """bitsmith: post-training weight quantization for LLM checkpoints."""
    ctx.obj = {"debug": debug}
