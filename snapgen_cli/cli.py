"""The ``snapgen`` command line: a Click group with one thin function per subcommand.

Each subcommand turns its flags into a stage ``Config`` and calls the stage's ``run``;
results go to stdout (a path, or one JSON object with ``--json``), progress and logs to
stderr. Exit codes: 0 success, 2 bad usage or config, 1 runtime failure.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import ConfigError, SnapgenError

CONTEXT = dict(help_option_names=["-h", "--help"], show_default=True, max_content_width=100)


def stderr_console() -> Console:
    """Logs and progress go to stderr; a non-terminal gets a wide, colourless console.
    (Called by commands that do work; it also mutes the libraries' own progress bars.)"""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    tty = sys.stderr.isatty()
    return Console(file=sys.stderr, width=None if tty else 140, no_color=not tty and "FORCE_COLOR" not in os.environ)


def emit(result, as_json: bool, text: str | None = None) -> None:
    """The result on stdout: one JSON object with ``--json``, else ``text`` (e.g. a path).

    Under a multi-process launcher (``accelerate launch``/``torchrun`` set ``RANK``) only rank 0 prints, so a
    shell pipeline still reads exactly one result."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        click.echo(json.dumps(result, default=str, sort_keys=True))
    elif text is not None:
        click.echo(text)


def _validate_flags(config_cls, values: dict):
    """Flag values -> a stage Config; a bad value names the flag (``--resolution: ...``)."""
    from pydantic import ValidationError

    from .recipe import format_validation_error

    try:
        return config_cls.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        key, _, rest = format_validation_error(exc, "").partition(":")
        raise ConfigError(f"--{key.split('.')[0].replace('_', '-')}:{rest}") from None


class Subcommand(NamedTuple):
    """How a stage subcommand differs from the rest: its summary, the list field that also takes
    positional arguments (``generate``'s prompts), and ``--out``'s default (``None``: required)."""

    summary: str
    positional: str | None = None
    default_out: str | None = None


class LazyGroup(click.Group):
    """A group whose stage subcommands are built (and their modules imported) only when
    used, so ``snapgen --help`` stays fast; the listing uses their one-line summaries."""

    lazy: dict[str, Subcommand] = {}

    def list_commands(self, ctx):
        return sorted([*self.commands, *self.lazy])

    def get_command(self, ctx, name):
        if name not in self.commands and name in self.lazy:
            self.add_command(stage_command(name, *self.lazy[name]))
        return self.commands.get(name)

    def format_commands(self, ctx, formatter):
        rows = [(n, self.lazy[n].summary if n in self.lazy and n not in self.commands
                 else self.commands[n].get_short_help_str(80)) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="snapgen")
def cli():
    """snapgen: train, distill, evaluate, export and benchmark SnapGen-style text-to-image models
    (SnapGen: an efficient 379M UNet + a 1.38M tiny decoder, Hu et al. 2024).

    \b
    Replay a recipe:     snapgen run recipes/paper.toml --dry-run
    Benchmark a model:   snapgen bench-device --model unet --preset snapgen-t2i --json
    """


# ----------------------------------------------------------------------------------------- run

@cli.command("run", context_settings=CONTEXT)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate, build every model on the meta device, print the plan.")
@click.option("--from", "start", metavar="STAGE", help="Start at this stage (earlier ones must be done).")
@click.option("--only", metavar="STAGE", help="Run only this stage.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a recipe value, e.g. --set stages.pretrain.steps=10 (TOML value syntax).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default: the recipe's run.out_dir).")
@click.option("--fresh", is_flag=True, help="Start over: delete the selected stages' outputs and run them again.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, show_default="the recipe's run.jobs, else 1",
              help="Stages run at once, each in its own process once the stages it reads are done "
                   "(logs in <run dir>/logs/); a stage without threads gets cores / jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def run_cmd(recipe, dry_run, start, only, overrides, out_dir, fresh, jobs, as_json):
    """Run the stages of RECIPE in order, each reading the previous stage's output.

    Without RECIPE, runs the bundled demo (recipes/demo.toml): the paper's whole stage
    sequence at toy scale on a laptop CPU in minutes. Stages that finished (marked
    atomically after success) are skipped on re-run; --fresh starts over. The run ends
    with <run dir>/report.md and report.json.
    """
    from .recipe import DEMO_RECIPE, load_recipe, plan_recipe, run_recipe, select_stages
    from .schedule import stage_dependencies

    recipe = recipe or DEMO_RECIPE
    rec = load_recipe(recipe, overrides)
    run_dir = Path(out_dir or rec.run.out_dir)
    stages = select_stages(rec, start, only, run_dir)
    console = stderr_console()
    if dry_run:
        rows = plan_recipe(rec, run_dir, stages, console)
        deps = stage_dependencies(rec, run_dir, console)
        _print_plan(rec, rows, deps, console)
        emit(dict(recipe=str(recipe), run_dir=str(run_dir), plan=rows, after=deps), as_json, str(run_dir))
        return
    results = run_recipe(rec, run_dir, stages, console, fresh=fresh, jobs=jobs)
    emit(dict(recipe=str(recipe), run_dir=str(run_dir), stages=results), as_json, str(run_dir))


def _print_plan(rec, rows, deps, console) -> None:
    t = Table(title=f"plan: {rec.run.name} ({len(rec.stages)} stages)")
    for col in ("stage", "kind", "after", "model", "params", "inputs", "outputs"):
        t.add_column(col, overflow="fold")
    for r in rows:
        params = "-" if r["params"] is None else f"{r['params'] / 1e6:,.2f}M"
        t.add_row(r["stage"], r["kind"], ", ".join(deps[r["stage"]]) or "-", r["model"], params,
                  "\n".join(r["inputs"]) or "-", "\n".join(r["outputs"]) or "-")
    console.print(t)


# ------------------------------------------------------------------------ stage subcommands
# Every stage subcommand is generated from its stage's pydantic Config: one option per
# field (its description is the help, its default is shown), plus --out, --set, --dry-run
# and --json. The command only turns flags into the Config and calls the stage's run();
# stdout gets the out dir, or the stage's RESULT_FILE in it, or one JSON object (--json).

def _unwrap(annotation):
    """``(base annotation, optional)``: ``X | None`` -> X, ``Annotated[X, ...]`` (PositiveInt) -> X."""
    import types
    import typing

    optional = False
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
            annotation, optional = next(a for a in args if a is not type(None)), True
        else:
            return annotation, optional


def _click_type(annotation):
    """(click type, multiple, nargs, is_flag) for a pydantic field annotation. An optional
    number is read as text so that ``none`` can unset it, as in a recipe (``StageConfig``)."""
    import typing

    annotation, optional = _unwrap(annotation)
    args = [_unwrap(a)[0] for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return bool, False, 1, True
    if annotation in (int, float, str):
        return (str if optional else annotation), False, 1, False
    if origin is typing.Literal:
        return click.Choice([str(a) for a in args] + (["none"] if optional else [])), False, 1, False
    if origin is list and args and args[0] in (int, float, str):
        return args[0], True, 1, False
    if origin is list and args and typing.get_origin(args[0]) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(args[0])]), True, 1, False
    if origin is tuple and args and all(a in (int, float) for a in args):
        return args[0], False, len(args), False
    return str, False, 1, False  # tables, specs, unions: a TOML value, e.g. '{a = 1}'


def _is_toml(annotation) -> bool:
    """Whether a flag's text is a TOML value (tables, specs, unions) rather than the value itself."""
    base = _unwrap(annotation)[0]
    return not (base in (bool, int, float, str) or _click_type(annotation)[0] is not str)


def _metavar(annotation, multiple: bool) -> str | None:
    import typing

    base, optional = _unwrap(annotation)
    if _is_toml(annotation) and not multiple:
        # a number or words (``--threads INTEGER|all|none``), else any TOML value
        names = {int: ["INTEGER"], float: ["FLOAT"], type(None): ["none"]}
        parts = [names.get(a) or ([str(x) for x in typing.get_args(a)] if typing.get_origin(a) is typing.Literal
                                  else None) for a in (_unwrap(x)[0] for x in typing.get_args(base))]
        return "|".join(sum(parts, [])) if parts and all(parts) else "VALUE"
    if optional and base in (int, float):
        return f"{'INTEGER' if base is int else 'FLOAT'}|none"
    return None


def _field_options(config_cls):
    from pydantic_core import PydanticUndefined

    opts = []
    for name, f in config_cls.model_fields.items():
        typ, multiple, nargs, flag = _click_type(f.annotation)
        flag_name = "--" + name.replace("_", "-")
        required = f.default is PydanticUndefined and f.default_factory is None
        default = None if required or f.default_factory is not None else f.default
        kw = dict(help=f.description or "", show_default=default is not None and not multiple)
        if flag:
            decl = f"{flag_name}/--no-{name.replace('_', '-')}"
            opts.append(click.option(decl, name, default=default, **kw))
        else:
            opts.append(click.option(flag_name, name, type=typ, multiple=multiple, nargs=nargs,
                                     default=() if multiple else default, required=False,
                                     metavar=_metavar(f.annotation, multiple), **kw))
    return opts


def _flags_to_config(config_cls, flags: dict, overrides: tuple[str, ...]):
    from .recipe import _parse_value, apply_override

    data = {}
    for k, v in flags.items():
        if v is None or v == ():
            continue
        f = config_cls.model_fields[k]
        if isinstance(v, str) and _is_toml(f.annotation):
            v = _parse_value(v)
        elif isinstance(v, tuple):
            v = list(v)
        data[k] = v
    for assignment in overrides:
        apply_override(data, assignment)
    return _validate_flags(config_cls, data)


def stage_command(kind: str, summary: str, positional: str | None = None, default_out: str | None = None):
    """A Click command for stage ``kind``: flags from its Config, then ``run(cfg, ctx)``."""
    from .recipe import stage_module

    module = stage_module(kind)
    result_file = getattr(module, "RESULT_FILE", None)

    def callback(out, overrides, dry_run, as_json, **flags):
        from click.core import ParameterSource

        from .stages.base import StageContext, run_stage

        # only the flags given: the Config's own defaults fill the rest, and it knows which keys were set
        source = click.get_current_context().get_parameter_source
        flags = {k: v for k, v in flags.items() if k == "_positional" or source(k) is not ParameterSource.DEFAULT}
        if positional:
            flags[positional] = tuple(flags.pop("_positional")) + tuple(flags.get(positional) or ())
        cfg = _flags_to_config(module.Config, flags, overrides)
        console = stderr_console()
        ctx = StageContext(out_dir=Path(out), dry_run=dry_run, console=console)
        shown = str(ctx.out_dir / result_file) if result_file else str(out)
        if dry_run:
            rows = [item.__dict__ for item in module.plan(cfg, ctx)]
            for r in rows:
                console.print(r)
            emit(dict(stage=kind, plan=rows, config=cfg.model_dump(mode="json")), as_json, shown)
            return
        result = run_stage(module, cfg, ctx)
        emit(result, as_json, shown)

    cmd = click.command(kind, context_settings=CONTEXT, help=(module.__doc__ or summary).strip(), short_help=summary)(callback)
    for opt in _field_options(module.Config):
        cmd = opt(cmd)
    out_help = "Output directory" + (f" (the result goes to {result_file} there)." if result_file else ".")
    cmd = click.option("--out", required=default_out is None, default=default_out, show_default=default_out is not None,
                       type=click.Path(file_okay=False, path_type=Path), help=out_help)(cmd)
    cmd = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                       help="Set any config key (TOML value syntax), e.g. --set model_overrides.layers_per_block=1.")(cmd)
    cmd = click.option("--dry-run", is_flag=True, help="Validate and print the plan; touch nothing.")(cmd)
    cmd = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(cmd)
    if positional:
        cmd = click.argument("_positional", nargs=-1, metavar=positional.upper())(cmd)
    return cmd


LazyGroup.lazy = {
    "shapes-data": Subcommand("The demo's built-in data: captioned, class-labelled and held-out shape images."),
    "precompute": Subcommand("Images + captions -> latent and text-embedding shards."),
    "train-decoder": Subcommand("Train the tiny decoder (or a small autoencoder) against a frozen encoder."),
    "pretrain": Subcommand("Train the UNet from scratch on class-conditional shards."),
    "finetune": Subcommand("Text-to-image training on latent + text shards."),
    "distill": Subcommand("Multi-level knowledge distillation from an SD3 DiT teacher (Eq. 4-8)."),
    "step-distill": Subcommand("Adversarial step distillation to 4/8 steps with a few-step DiT teacher (Eq. 9)."),
    "generate": Subcommand("Prompts -> PNGs from a trained pipeline dir.", positional="prompts"),
    "eval": Subcommand("Generate with fixed seeds and score: alignment, FID, CLIP, PSNR, GenEval, DPG-Bench."),
    "export": Subcommand("A pipeline -> ONNX and Core ML artefacts with a parity gate and export.json."),
    "bench-device": Subcommand("Parameters, MACs (= FLOPs/2, the paper's convention), latency and peak memory.",
                               default_out="runs/bench-device"),
}


# ------------------------------------------------------------------------------------- entry

_OS_FIXES = {errno.ENOSPC: "free some space or write elsewhere (--out)",
             errno.EDQUOT: "free some space or write elsewhere (--out)",
             errno.EFBIG: "the file-size limit (ulimit -f) is too small for it; raise it or write elsewhere",
             errno.EACCES: "check the permissions, or write elsewhere (--out)",
             errno.EROFS: "the file system is read-only; write elsewhere (--out)",
             errno.ENOTDIR: "a parent of the path is a file, not a directory; choose another path",
             errno.EEXIST: "something else is in the way at that path; remove it or choose another path"}


def os_error_message(exc: OSError) -> str:
    """One line for an OS failure: what, where and what to do. Nothing already written is lost:
    every file snapgen writes goes to a temp file first and is renamed into place."""
    where = exc.filename or "(file system)"
    what = exc.strerror or str(exc)
    fix = _OS_FIXES.get(exc.errno, "check the path and the file system")
    return f"{where}: {what}; {fix}"


def main(argv=None) -> None:
    """Console entry point: maps errors to one clear line and the documented exit codes."""
    from .cpu import bounded_spin_wait

    bounded_spin_wait()  # before anything imports torch (cpu.py)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    code = None  # stays None if something other than _main's exit propagates
    try:
        _main(argv)  # always ends in sys.exit with the documented code, 0 on success
    except SystemExit as exc:
        code = exc.code
        raise
    finally:
        from .cpu import close_process_group

        close_process_group(wait=code == 0)  # a training stage under `accelerate launch` set one up


def _main(argv) -> None:
    try:
        cli.main(args=argv, prog_name="snapgen", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except SnapgenError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # the file system refused: one line naming the path, exit 1
        click.echo(f"error: {os_error_message(exc)}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
