"""The `facegen` command line: thin click commands that parse options, call the library and print clear errors.

A user's mistake gets one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import click

from facegen.errors import SampleError, UsageError


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


@main.command("plugins")
def plugins_command():
    """List the installed source and transform plugins."""
    from facegen import registry

    rows = []
    for kind in ("source", "transform"):
        for name, entry in registry.discover(kind).items():
            description = entry.description
            status = f"FAILED TO LOAD: {entry.error}" if entry.error else description
            rows.append((name, kind, entry.distribution, status))
    width = max((len(r[0]) for r in rows), default=4)
    dist_width = max((len(r[2]) for r in rows), default=12)
    click.echo(f"{'name':<{width}}  {'kind':<9}  {'distribution':<{dist_width}}  description")
    for name, kind, dist, status in rows:
        click.echo(f"{name:<{width}}  {kind:<9}  {dist:<{dist_width}}  {status}")


@main.command("build")
@click.option("--source", help="Source plugin name (see `facegen plugins`).")
@click.option("--source-path", type=click.Path(), help="Where the source dataset lies.")
@click.option("--source-opt", "source_opts", multiple=True, metavar="K=V", help="Source option (repeatable).")
@click.option("--plugin", help="Transform plugin name (see `facegen plugins`).")
@click.option("--plugin-opt", "plugin_opts", multiple=True, metavar="K=V", help="Transform option (repeatable).")
@click.option("--out", type=click.Path(), help="Output folder.")
@click.option("--recipe", help="Built-in recipe name or YAML file holding these options (the CLI overrides it).")
@click.option("--limit-identities", type=int, help="Keep only the first N identities of the plan.")
@click.option("--identities-file", type=click.Path(), help="File of identity ids to keep (one per line).")
@click.option("--shard-size", type=int, help="Identities per shard (default 100).")
@click.option("--seed", type=int, help="Run seed; per-identity seeds derive from it (default 0).")
@click.option("--format", "image_format", type=click.Choice(["png", "jpg"]), help="Image encoding of the output.")
@click.option("--strict", is_flag=True, default=None, help="Stop at the first bad sample instead of skipping it.")
@click.option("--overwrite", is_flag=True, help="Replace a different build already in --out.")
def build_command(source, source_path, source_opts, plugin, plugin_opts, out, recipe, limit_identities,
                  identities_file, shard_size, seed, image_format, strict, overwrite):
    """Build (or resume) a dataset: source -> transform -> WebDataset shards + card."""
    from facegen.builders.options import BuildConfig, load_recipe, merge_recipe, parse_pairs
    from facegen.builders.run import build

    cli_values = {
        "source": source, "source_path": source_path, "source_opts": parse_pairs(source_opts, "--source-opt"),
        "plugin": plugin, "plugin_opts": parse_pairs(plugin_opts, "--plugin-opt"),
        "limit_identities": limit_identities, "identities_file": identities_file, "shard_size": shard_size,
        "seed": seed, "format": image_format, "strict": strict,
    }
    values = merge_recipe(load_recipe(recipe) if recipe else {}, cli_values)
    values = {k: v for k, v in values.items() if v is not None}
    config = BuildConfig(out=out, recipe=recipe, overwrite=overwrite, command=["facegen", *sys.argv[1:]], **values)
    try:
        summary = build(config)
    except SampleError as exc:
        raise UsageError(f"bad sample {exc.ref}: {exc.reason} (--strict stops at the first bad sample)") from None
    if summary is not None:
        for line in summary.lines():
            click.echo(line)

# --- download (issue 3) ---

# --- arc2face commands: embed, select-identities, estimate-shift, demo (issue 5) ---

# --- publish and card (issue 7) ---
