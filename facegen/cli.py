"""The `facegen` command line: thin click commands that parse options, call the library and print clear errors.

A user's mistake gets one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import click

from facegen.errors import UsageError


class FacegenGroup(click.Group):
    """A click group whose usage errors are one line (``facegen: error: …``) with exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name or "facegen", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click.UsageError as exc:
            hint = f" (see: facegen {exc.ctx.info_name} --help)" if exc.ctx and exc.ctx.parent else ""
            click.echo(f"facegen: error: {exc.format_message()}{hint}", err=True)
            sys.exit(2)
        except UsageError as exc:
            click.echo(f"facegen: error: {exc}", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("facegen: aborted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"facegen: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=FacegenGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="facegen")
def main():
    """facegen: synthetic-face sources through realism transforms into sharded Hugging Face datasets."""


# --- plugins and build (issue 2) ---

# --- download (issue 3) ---

# --- arc2face commands: embed, select-identities, estimate-shift, demo (issue 5) ---

# --- publish and card (issue 7) ---
