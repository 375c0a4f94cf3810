"""The `facegen` command line: thin click commands that parse options, call the library and print clear errors.

Every failure leaves through ``FacegenGroup.main``: one line on stderr and the exit code of its kind (see
``facegen.errors`` and the README's "Exit codes"), never a traceback; Ctrl-C exits 130 and SIGTERM 143 for every
command, with a line saying what was kept.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager, nullcontext

import click

from facegen.errors import CheckFailed, RemoteError, SampleError, UsageError
from facegen.messages import count, skipped_line

# The one mapping of facegen's errors to exit codes: 2 when the user's input, options or environment must change,
# 1 when a check the command exists to make fails or a remote service fails.
EXIT_CODES = {UsageError: 2, SampleError: 2, CheckFailed: 1, RemoteError: 1}
INTERRUPTED, TERMINATED = 130, 143
# What an interrupted command leaves behind; any other command: "rerun the same command".
AFTER_A_STOP = {
    # the build's units of work, then the published shards assembled from them: either may be what is kept
    "build": "complete units of work and shards are kept; rerun the same command to resume",
    "curate": "complete units of work and shards are kept; rerun the same command to resume",
    "demo": "complete units of work and shards are kept; rerun the same command to resume",
    "download": "what arrived is kept in a partial file; rerun the same command to resume",
    "export": "what was exported is kept; rerun the same command to resume",
    "publish": "rerun the same command to resume the upload (files already committed are skipped)",
}


class _Terminated(BaseException):
    """SIGTERM (a preempted SLURM job, `kill`): unwinds like Ctrl-C, so that locks and partial files are released
    at once. A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""


class _Stopped(Exception):
    """A command stopped by Ctrl-C or SIGTERM, carried out of click (which would turn Ctrl-C into Abort)."""

    def __init__(self, word: str, code: int, command: str | None):
        super().__init__(word)
        self.word, self.code, self.command = word, code, command


def _error_line(exc: Exception) -> str:
    if isinstance(exc, SampleError):
        return f"bad sample {exc.ref}: {exc.reason} (--strict stops at the first bad sample)"
    return str(exc)


class FacegenGroup(click.Group):
    """The click group through which every command's failure leaves: one line ``facegen: error: …`` and the exit
    code of its kind. A library caller (``facegen.builders…``) gets the exceptions themselves."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with _terminate_as_interrupt():
                rv = super().main(args, prog_name or "facegen", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click.UsageError as exc:
            hint = f" (see: facegen {exc.ctx.info_name} --help)" if exc.ctx and exc.ctx.parent else ""
            click.echo(f"facegen: error: {exc.format_message()}{hint}", err=True)
            sys.exit(2)
        except tuple(EXIT_CODES) as exc:
            click.echo(f"facegen: error: {_error_line(exc)}", err=True)
            sys.exit(next(code for kind, code in EXIT_CODES.items() if isinstance(exc, kind)))
        except (_Stopped, _Terminated) as exc:  # the newline leaves a progress bar's line
            if isinstance(exc, _Terminated):  # before or after the command itself
                exc = _Stopped("terminated", TERMINATED, None)
            after = AFTER_A_STOP.get(exc.command, "rerun the same command")
            click.echo(f"\nfacegen: {exc.word}: {after}", err=True)
            sys.exit(exc.code)
        except click.exceptions.Abort:  # Ctrl-C at a question (the licence of `download`)
            click.echo("facegen: aborted", err=True)
            sys.exit(INTERRUPTED)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"facegen: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Stopped("interrupted", INTERRUPTED, ctx.invoked_subcommand) from None
        except _Terminated:
            raise _Stopped("terminated", TERMINATED, ctx.invoked_subcommand) from None


@contextmanager
def _terminate_as_interrupt():
    def terminated(signum, frame):
        raise _Terminated()

    try:
        previous, installed = signal.signal(signal.SIGTERM, terminated), True
    except ValueError:  # not the main thread: leave signals alone
        previous, installed = None, False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


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
@click.option("--shard-size", type=int, help="Identities per unit of work (default 100).")
@click.option("--shard-samples", type=int,
              help="Target samples per published shard (default 10000; recipes set their own).")
@click.option("--shards-multiple-of", type=int,
              help="Round the shard count up to a multiple of this, e.g. ranks x DataLoader workers (default: a "
                   "multiple of 32 from 16,000 samples on, else an even count of shards of at least 500 samples).")
@click.option("--seed", type=int, help="Run seed; per-identity seeds derive from it (default 0).")
@click.option("--format", "image_format", type=click.Choice(["png", "jpg"]), help="Image encoding of the output.")
@click.option("--strict/--no-strict", default=None, help="Stop at the first bad sample instead of skipping it.")
@click.option("--verify", type=click.Choice(["full", "header"]),
              help="full (default): decode every image once before writing it; header: PIL's cheap check only.")
@click.option("--overwrite", is_flag=True, help="Replace a different build already in --out.")
@click.option("--from-card", "from_card", metavar="PATH_OR_REPO",
              help="Rebuild a facegen dataset from its card (a build folder, its README.md, or a Hub ORG/NAME); "
                   "the options given here override the card's.")
@click.option("--break-lock", is_flag=True,
              help="Take --out's lock even if another build holds it (only when that build is known to be gone).")
def build_command(source, source_path, source_opts, plugin, plugin_opts, out, recipe, limit_identities,
                  identities_file, shard_size, shard_samples, shards_multiple_of, seed, image_format, strict,
                  verify, overwrite, from_card, break_lock):
    """Build (or resume) a dataset: source -> transform -> WebDataset shards + card."""
    from facegen.builders.engine.options import BuildConfig, load_recipe, merge_recipe, parse_pairs
    from facegen.builders.engine.run import build

    cli_values = {
        "source": source, "source_path": source_path, "source_opts": parse_pairs(source_opts, "--source-opt"),
        "plugin": plugin, "plugin_opts": parse_pairs(plugin_opts, "--plugin-opt"),
        "limit_identities": limit_identities, "identities_file": identities_file, "shard_size": shard_size,
        "shard_samples": shard_samples, "shards_multiple_of": shards_multiple_of, "seed": seed,
        "format": image_format, "strict": strict, "verify": verify,
    }
    record = None
    if from_card:
        from facegen.builders.hub.from_card import build_values, read_card

        if recipe:
            raise UsageError("--from-card and --recipe both give every option: use one")
        record = read_card(from_card)
        values = build_values(record, cli_values)
    else:
        values = merge_recipe(load_recipe(recipe) if recipe else {}, cli_values)
    values = {k: v for k, v in values.items() if v is not None}
    check_models = None
    if record is not None:
        from facegen.builders.hub.from_card import models_check

        check_models = models_check(record)
    config = BuildConfig(out=out, recipe=recipe, overwrite=overwrite, break_lock=break_lock, offers_break_lock=True,
                         command=["facegen", *sys.argv[1:]], check_models=check_models, **values)
    summary = build(config)
    if summary is not None:
        for line in summary.lines():
            click.echo(line)
        if record is not None:
            from pathlib import Path

            from facegen.builders.hub.from_card import compare

            same, line = compare(record, Path(out))
            if not same:
                raise CheckFailed(f"rebuild differs from {from_card}: {line}")
            click.echo(f"rebuild of {from_card}: {line}")


# --- download (issue 3) ---


@main.command("download")
@click.argument("source")
@click.option("--to", "directory", required=True, type=click.Path(file_okay=False),
              help="Folder to download into (then use it as --source-path).")
@click.option("--parts", help="Comma-separated part names, e.g. subjects_0-1999_72_imgs (default: all).")
@click.option("--base-url", help="Download from this mirror instead of the publisher's URL.")
@click.option("--accept-license", is_flag=True, help="Accept the source's licence (shown first) without asking.")
@click.option("--retries", type=int, default=3, show_default=True,
              help="Automatic resumes (HTTP Range) after a dropped connection.")
def download_command(source, directory, parts, base_url, accept_license, retries):
    """Download a source's published files: licence first, resumable, verified before use."""
    from facegen import registry
    from facegen.api import to_list
    from facegen.builders.hub.download import download_source

    source_cls = registry.get_source(source)
    # an interactive yes when the licence was not accepted on the command line and someone is there to answer
    ask = (lambda question: click.confirm(question, default=False)) if sys.stdin.isatty() else None
    download_source(source_cls, directory, parts=to_list(parts), base_url=base_url, accept_license=accept_license,
                    confirm=ask, retries=retries)

# --- arc2face commands: embed, select-identities, estimate-shift, demo (issue 5) ---


@main.command("embed")
@click.option("--source", required=True, help="Source plugin name (see `facegen plugins`).")
@click.option("--source-path", required=True, type=click.Path(), help="Where the source dataset lies.")
@click.option("--source-opt", "source_opts", multiple=True, metavar="K=V", help="Source option (repeatable).")
@click.option("--model-dir", type=click.Path(), help="Local model folder (as the arc2face model_dir); default: Hub.")
@click.option("--detector", type=click.Choice(["scrfd", "dlib"]), default="scrfd", show_default=True,
              help="Face detector for images that are not 112x112 crops.")
@click.option("--det-size", type=int, default=640, show_default=True, help="SCRFD input size (square).")
@click.option("--limit-identities", type=int, help="Embed only the first N identities.")
@click.option("--realign", is_flag=True,
              help="Detect and align 112x112 crops (DigiFace) again before embedding, as Arc2Face's demo does with "
                   "any input (default: embed them as they are, as Digi2Real does).")
@click.option("--identities-per-batch", type=int, default=16, show_default=True,
              help="Identities per recogniser pass; a rerun after an interruption resumes from the last whole batch.")
@click.option("--out", required=True, type=click.Path(), help="Output prototypes.npz.")
def embed_command(source, source_path, source_opts, model_dir, detector, det_size, limit_identities, realign,
                  identities_per_batch, out):
    """Identity prototypes (normalised mean unit ArcFace embedding) -> prototypes.npz (ids, embeddings).

    On many processes (`accelerate launch`, `torchrun`) the identities are shared out by batches; the result is the
    same bytes as on one process."""
    import os

    from facegen.builders.engine.options import parse_pairs
    from facegen.builders.quality.identities import FaceEmbedder, embed_source, open_source
    from facegen.builders.quality.pieces import Ranks, remove_pieces
    from facegen.generators.arcface import default_providers
    from facegen.layout import pieces_folder

    if identities_per_batch < 1:
        raise UsageError("--identities-per-batch must be at least 1")
    if os.path.isdir(out):
        raise UsageError(f"--out {out} is a folder; give the prototypes file's name, e.g. {out}/prototypes.npz")
    ranks = Ranks.current()
    src = open_source(source, source_path, parse_pairs(source_opts, "--source-opt"))
    embedder = FaceEmbedder(model_dir, detector=detector, det_size=det_size, realign=realign,
                            providers=default_providers(device_id=ranks.gpu() if ranks.count > 1 else None))
    pieces = pieces_folder(os.path.abspath(out))
    prototypes = embed_source(src, embedder, limit=limit_identities, identities_per_batch=identities_per_batch,
                              pieces=pieces, ranks=ranks)
    src.close()
    if prototypes is None:  # another process: the main one writes
        return
    if not prototypes.ids:
        remove_pieces(pieces)
        raise UsageError(f"no identity of {source_path} has a usable face image; nothing written")
    prototypes.save(out)
    remove_pieces(pieces)
    click.echo(f"{count(len(prototypes.ids), 'prototype')} from {count(int(prototypes.num_images.sum()), 'image')} "
               f"-> {out}")
    if prototypes.skipped:
        click.echo(skipped_line([skip.reason for skip in prototypes.skipped]))
    if prototypes.identities_without_images:
        click.echo(f"{count(len(prototypes.identities_without_images), 'identity')} without a usable image left out")


@main.command("select-identities")
@click.option("--prototypes", required=True, type=click.Path(), help="prototypes.npz from `facegen embed`.")
@click.option("--count", "keep", required=True, type=int, help="How many identities to keep.")
@click.option("--block", type=int, default=2048, show_default=True, help="Rows/columns per similarity tile.")
@click.option("--method", type=click.Choice(["one-pass", "greedy"]), default="one-pass", show_default=True,
              help="one-pass: rank by highest similarity to any other identity, keep the first COUNT (the paper's "
                   "sorted list; drops both members of a near-duplicate pair). greedy: drop the identity most "
                   "similar to another remaining one, one at a time, until COUNT remain (keeps one of each pair).")
@click.option("--out", required=True, type=click.Path(), help="Output ids.txt (for --identities-file).")
def select_identities_command(prototypes, keep, block, method, out):
    """Keep the COUNT most distinct identities (see --method), for --identities-file."""
    from facegen.builders.quality.identities import load_prototypes, select_identities, write_ids

    if block < 1:
        raise UsageError("--block must be at least 1")
    ids, embeddings = load_prototypes(prototypes)
    selection = select_identities(ids, embeddings, keep, method=method, block=block)
    kept = (f"kept: highest cosine similarity to any other identity <= {selection.threshold:.6f}"
            if method == "one-pass" else
            f"kept (greedy: the most similar remaining identity dropped one at a time): highest cosine similarity "
            f"to another kept identity <= {selection.threshold:.6f}")
    write_ids(out, selection, [
        f"facegen select-identities: {len(selection.ids)} of {count(selection.total, 'identity')} of {prototypes}",
        kept,
        "order: most distinct first (facegen build keeps the source's order)",
    ])
    other = "another" if method == "one-pass" else "another kept one"
    click.echo(f"kept {len(selection.ids)} of {count(selection.total, 'identity')} ({method}; highest similarity "
               f"to {other} <= {selection.threshold:.4f}) in {selection.seconds:.1f} s -> {out}")


@main.command("estimate-shift")
@click.option("--real", "real", multiple=True, required=True, metavar="SOURCE_SPEC",
              help="Real images: NAME:PATH[:k=v,...] (repeatable), e.g. folder:/data/ffhq.")
@click.option("--synthetic", "synthetic", multiple=True, required=True, metavar="SOURCE_SPEC",
              help="Synthetic images: NAME:PATH[:k=v,...] (repeatable), e.g. digiface:/data/digiface.")
@click.option("--model-dir", type=click.Path(), help="Local model folder (as the arc2face model_dir); default: Hub.")
@click.option("--max-images", type=int, default=1000, show_default=True, help="Images sampled per set.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image sampling.")
@click.option("--device", help="Torch device of the text encoder (default: cuda when available).")
@click.option("--detector", type=click.Choice(["scrfd", "dlib"]), default="scrfd", show_default=True,
              help="Face detector for images that are not 112x112 crops.")
@click.option("--det-size", type=int, default=640, show_default=True, help="SCRFD input size (square).")
@click.option("--realign", is_flag=True,
              help="Detect and align 112x112 crops (DigiFace) again before embedding, as Arc2Face's demo does with "
                   "any input (default: embed them as they are, as Digi2Real does).")
@click.option("--out", required=True, type=click.Path(), help="Output delta.safetensors (key 'delta').")
def estimate_shift_command(real, synthetic, model_dir, max_images, seed, device, detector, det_size, realign, out):
    """Domain-gap shift: mean projected Arc2Face encoder output over real minus over synthetic images."""
    import os

    from facegen.builders.quality.shift import estimate_shift, parse_source_spec

    real_specs = [parse_source_spec(s) for s in real]
    synthetic_specs = [parse_source_spec(s) for s in synthetic]
    if model_dir is not None and not os.path.isdir(model_dir):
        raise UsageError(f"model directory {model_dir} does not exist")
    estimate = estimate_shift(real_specs, synthetic_specs, model_dir=model_dir, max_images=max_images, seed=seed,
                              device=device, detector=detector, det_size=det_size, realign=realign)
    estimate.save(out)
    for line in estimate.lines():
        click.echo(line)
    click.echo(f"-> {out} (use it with --plugin-opt shift={out})")


@main.command("demo")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Rebuild the demo dataset in OUT from scratch.")
def demo_command(out, overwrite):
    """Build a small Digi2Real dataset end to end, offline, with tiny RANDOM-WEIGHT models (the faces are noise)."""
    from facegen.builders.demo import run_demo

    run_demo(out, overwrite=overwrite)

# --- publish and card (issue 7) ---


@main.command("publish")
@click.argument("out", type=click.Path())
@click.option("--repo", "repo_id", required=True, metavar="ORG/NAME", help="Hub dataset repository to upload to.")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its setting).")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created when missing; default main).")
@click.option("--dry-run", is_flag=True, help="Check the folder and list what would be uploaded; contact nothing.")
@click.option("--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN, then the saved `hf auth login`).")
@click.option("--no-gating", is_flag=True,
              help="Do not gate research-only data (no access form in the card, the repo's gate left as it is).")
@click.option("--verify", type=click.Choice(["full", "header"]), default="full", show_default=True,
              help="full: decode every image before uploading; header: only check the tars and checksums.")
def publish_command(out, repo_id, private, revision, dry_run, token, no_gating, verify):
    """Check a finished build folder and upload it to a Hub dataset repo (rerun to resume an interrupted upload)."""
    from facegen.builders.hub.publish import publish

    publish(out, repo_id, private=private, revision=revision, dry_run=dry_run, token=token, gating=not no_gating,
            verify=verify)


@main.command("card")
@click.argument("out", type=click.Path())
@click.option("--repo", "repo_id", metavar="ORG/NAME", help="Name this Hub repo in the card's loading examples.")
@click.option("--gating/--no-gating", default=None,
              help="Add (default) or leave out the Hub access form for research-only data (remembered).")
def card_command(out, repo_id, gating):
    """Re-render README.md, LICENSE and preview.jpg from OUT/.facegen without rebuilding."""
    from pathlib import Path

    from facegen.builders.engine.lock import output_lock
    from facegen.builders.engine.outputs import resolve_out
    from facegen.layout import LICENSE, PREVIEW, README, OutputFolder
    from facegen.hub_ids import check_repo_name

    if repo_id is not None:
        check_repo_name(repo_id)  # it is written into the card's code examples
    from facegen.cards import write_card

    folder = resolve_out(out)
    if not folder.is_dir():
        raise UsageError(f"{out}: no such folder" if not folder.exists() else f"{out} is a file, not a folder")
    # not while a build writes there (a folder without .facegen/ is no build: write_card says so)
    with output_lock(folder, command_breaks_locks=False) if OutputFolder(folder).records.is_dir() else nullcontext():
        files = write_card(out, repo_id=repo_id, gating=gating)
    planned = files.run.plan.shards
    if files.statistics.shards < planned:
        finished = files.statistics.shards
        click.echo(f"warning: only {finished} of {count(planned, 'shard')} {'is' if finished == 1 else 'are'} "
                   "finished; the card counts those (rerun the build command to finish the rest)", err=True)
    written = [README] + ([LICENSE] if files.license is not None else []) + (
        [PREVIEW] if files.preview is not None else [])
    click.echo(f"wrote {', '.join(str(Path(out) / name) for name in written)}")
    click.echo(f"licence: {files.card_data.license}"
               + (f" ({files.card_data.license_name})" if files.card_data.license == "other" else "")
               + f" — {files.chain.summary}")

# --- export (issue 20) ---


@main.command("export")
@click.argument("out", metavar="OUT", type=click.Path())
@click.option("--format", "fmt", required=True, type=click.Choice(["rec", "imagefolder"]),
              help="rec: train.rec + train.idx + property, insightface's layout (arcface_torch's MXFaceDataset); "
                   "imagefolder: DIR/{identity}/{n}.{ext} (torchvision's ImageFolder).")
@click.option("--to", "directory", required=True, type=click.Path(file_okay=False),
              help="Folder to export into (new or empty; rerun the same command to resume).")
@click.option("--shuffle", is_flag=True,
              help="rec: the header-less flavour in a shuffled order, as DALI's mxnet reader wants it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --shuffle's order.")
def export_command(out, fmt, directory, shuffle, seed):
    """Export the facegen dataset OUT (a folder, ORG/NAME or hf://datasets/ORG/NAME) for face-recognition trainers;
    image bytes are copied, never re-encoded, and the dataset's card and LICENSE go beside them."""
    from facegen.builders.export import export

    summary = export(out, directory, fmt, shuffle=shuffle, seed=seed)
    for line in summary.lines():
        click.echo(line)

# --- quality report and curation (issue 13) ---


def _recognizer_options(command):
    """Options shared by `report` and `curate`."""
    for option in reversed([
        click.option("--recognizer", type=click.Choice(["dlib", "arcface"]), default="dlib", show_default=True,
                     help="Face recogniser: dlib (real weights from PyPI, offline) or arcface (Arc2Face's)."),
        click.option("--model-dir", type=click.Path(), help="arcface: local model folder (default: the Hub)."),
        click.option("--detector", type=click.Choice(["scrfd", "dlib"]), default="scrfd", show_default=True,
                     help="arcface: face detector for images that are not 112x112 crops."),
        click.option("--dedup", type=float, help="Near-duplicate identities: prototype cosine >= this "
                                                  "(default: dlib 0.95, arcface 0.6)."),
        click.option("--min-similarity", type=float, help="Outlier samples: cosine to their prototype < this "
                                                          "(default: dlib 0.925, arcface 0.3)."),
        click.option("--batch-size", type=int, default=64, show_default=True, help="Images per recogniser call."),
    ]):
        command = option(command)
    return command


@main.command("report")
@click.argument("out", metavar="OUT", type=click.Path())
@_recognizer_options
@click.option("--against", metavar="PATH_OR_REPO",
              help="Another facegen dataset (a folder or ORG/NAME), a plain identity folder (one sub-folder of "
                   "images per identity): list identities of OUT that match one of its; or a verification .bin "
                   "(lfw.bin): list identities of OUT whose prototype matches one of its images (cosine >= "
                   "--min-similarity).")
@click.option("--out", "report_dir", type=click.Path(), metavar="DIR",
              help="Write report.json, report_embeddings.npz and report/*.png into DIR (required when OUT is a "
                   "Hub id; a local OUT's card is then left unchanged).")
def report_command(out, recognizer, model_dir, detector, dedup, min_similarity, batch_size, against, report_dir):
    """Quality report of OUT (a facegen dataset folder, ORG/NAME or hf://datasets/ORG/NAME): identity
    consistency, separability, near-duplicates, outliers -> .facegen/report.json, report/*.png and the card's
    Quality section (or into --out DIR)."""
    from facegen.builders.quality.report import run_report

    run_report(out, recognizer=recognizer, model_dir=model_dir, detector=detector, dedup=dedup,
               min_similarity=min_similarity, against=against, batch_size=batch_size, report_dir=report_dir)


@main.command("curate")
@click.argument("out", type=click.Path())
@click.option("--out", "new", required=True, type=click.Path(), help="Folder of the curated dataset.")
@_recognizer_options
@click.option("--min-images", type=int, default=1, show_default=True,
              help="Drop identities left with fewer images than this.")
@click.option("--max-removed", type=float, default=0.5, show_default=True,
              help="Stop when the curation would remove more than this share of the identities.")
@click.option("--overwrite", is_flag=True, help="Replace a different build already in --out.")
def curate_command(out, new, recognizer, model_dir, detector, dedup, min_similarity, batch_size, min_images,
                   max_removed, overwrite):
    """Drop near-duplicate identities, outlier samples and thin identities of OUT (a folder or a Hub id; by its
    report, kept in NEW); build the rest into a new dataset through `--source facegen`. OUT is never written to."""
    from facegen.builders.quality.curate import curate

    _, summary = curate(out, new, recognizer=recognizer, model_dir=model_dir, detector=detector, dedup=dedup,
                        min_similarity=min_similarity, min_images=min_images, batch_size=batch_size,
                        overwrite=overwrite, command=["facegen", *sys.argv[1:]], max_removed=max_removed)
    if summary is not None:
        for line in summary.lines():
            click.echo(line)
