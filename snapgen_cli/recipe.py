"""Recipes: plain TOML -> typed, validated stage configs -> a run of stages in order.

A recipe is a ``[run]`` table and a list of ``[[stages]]``::

    [run]
    name = "paper"
    out_dir = "runs/paper"     # relative paths resolve against the current directory
    seed = 0

    [[stages]]
    name = "pretrain"          # unique; the stage writes into <out_dir>/<name>
    kind = "pretrain"          # which stage module runs it (see ``STAGE_KINDS``)
    input = "previous"         # optional: "previous" (default), "@<stage name>" or a path
    lr = 3e-4                  # every other key belongs to the stage kind's Config

Validation errors name the key path and what was expected
(``stages[2].lr: expected a positive number, got "fast"``) and exit with code 2.
Each stage that succeeds gets an atomically written marker ``.snapgen-done.json`` in
its output dir; a re-run skips stages that have one (``--fresh`` ignores them).
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import PREVIOUS_OR_PATH, RUNTIME_KEYS, UNSET_IS_PREVIOUS
from .errors import ConfigError
from .files import atomic_write_json
from .stages.base import PlanItem, StageContext, is_main_process, launched_processes, run_stage, wait_for_everyone

#: Stage kinds and the modules that implement them (imported lazily).
STAGE_KINDS: dict[str, str] = {
    "precompute": "snapgen_cli.stages.precompute",
    "train-decoder": "snapgen_cli.stages.train_decoder",
    "pretrain": "snapgen_cli.stages.pretrain",
    "finetune": "snapgen_cli.stages.finetune",
    "distill": "snapgen_cli.stages.distill",
    "step-distill": "snapgen_cli.stages.step_distill",
    "generate": "snapgen_cli.stages.generate",
    "bench-device": "snapgen_cli.stages.bench_device",
    "shapes-data": "snapgen_cli.stages.shapes_data",
    "eval": "snapgen_cli.stages.eval",
    "export": "snapgen_cli.stages.export",
}

DONE_MARKER = ".snapgen-done.json"
#: A stage name is a folder of the run dir: no separators, no "." / "..", no hidden names.
STAGE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
#: The recipe ``snapgen run`` runs when given none: the paper's stage sequence at toy scale.
DEMO_RECIPE = Path(__file__).parent / "recipes" / "demo.toml"
_RESERVED = ("name", "kind", "input")


def stage_module(kind: str) -> ModuleType:
    return importlib.import_module(STAGE_KINDS[kind])


class RunSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = Field(0, ge=0)
    description: str = ""
    threads: int | None = Field(None, ge=1, description="CPU threads of every stage that sets none (cpu.py)")
    jobs: int = Field(1, ge=1, description="stages run at once, each after the stages it reads (schedule.py)")


@dataclass
class Stage:
    index: int
    name: str
    kind: str
    input: str | None
    config: Any  # the kind's pydantic Config

    @property
    def module(self) -> ModuleType:
        return stage_module(self.kind)


@dataclass
class Recipe:
    path: Path | None
    run: RunSection
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"no stage named {name!r} in the recipe; stages: {', '.join(s.name for s in self.stages)}")


# ---------------------------------------------------------------------------------------
# Errors: pydantic's structured errors -> one line naming the key path.

def _fmt_path(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_EXPECTED = {
    "float_parsing": "expected a number", "float_type": "expected a number",
    "int_parsing": "expected an integer", "int_type": "expected an integer", "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a table",
    "model_type": "expected a table", "tuple_type": "expected a list",
    "missing": "missing required key",
}


def _expected(err: dict) -> str:
    typ, ctx = err["type"], err.get("ctx") or {}
    if typ in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        if typ == "greater_than" and ctx.get("gt") == 0:
            return "expected a positive number"
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[typ]
        return f"expected a number {op} {list(ctx.values())[0]}"
    if typ == "literal_error":
        return f"expected one of {ctx.get('expected')}"
    if typ == "extra_forbidden":
        return "unknown key"
    if typ in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    if typ in ("too_short", "too_long"):
        return err["msg"].lower()
    return _EXPECTED.get(typ, err["msg"][0].lower() + err["msg"][1:])


def format_validation_error(exc: ValidationError, prefix: str, allowed: list[str] | None = None) -> str:
    """The first error of ``exc`` as one line ``<key path>: <expected>, got <value>``."""
    errors = exc.errors()
    err = errors[0]
    path = _fmt_path(prefix, err["loc"])
    msg = _expected(err)
    # a number-or-word union (``threads``: an integer or "all"): pydantic tags each member's error
    # (``threads.constrained-int``, ``threads.literal['all']``); one line with both, under the key
    members = [e for e in errors if len(e["loc"]) > 1 and e["loc"][:-1] == err["loc"][:-1]]
    if len(members) > 1 and any(str(e["loc"][-1]).startswith("literal[") for e in members):
        first, *rest = dict.fromkeys(_expected(e) for e in members)
        path = _fmt_path(prefix, err["loc"][:-1])
        msg = " or ".join([first, *(r.removeprefix("expected ") for r in rest)])
    if err["type"] == "extra_forbidden" and allowed:
        return f"{path}: unknown key; allowed keys: {', '.join(sorted(allowed))}"
    if err["type"] == "missing":
        return f"{path}: {msg}"
    return f"{path}: {msg}, got {json.dumps(err.get('input'), default=str)}"


def validate_config(config_cls: type[BaseModel], data: dict, prefix: str) -> BaseModel:
    try:
        return config_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix, list(config_cls.model_fields) + list(_RESERVED))) from None


# ---------------------------------------------------------------------------------------
# Loading, overrides, validation.

def read_toml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def _parse_value(text: str) -> Any:
    """``--set`` values are TOML values (``5e-5``, ``true``, ``[256, 512]``, ``"x"``); a bare
    word that is not valid TOML is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``key.path=value``. Stage keys may be addressed by index (``stages[2].lr`` or
    ``stages.2.lr``) or by stage name (``stages.pretrain.lr``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    key, value = assignment.split("=", 1)
    parts = [p for p in key.replace("[", ".").replace("]", "").split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            named = [s for s in node if isinstance(s, dict) and s.get("name") == part]
            if not named:
                raise ConfigError(f"--set {key}: no stage with index or name {part!r}")
            node = named[0]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a table")
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: cannot set a key inside a non-table value")
    node[parts[-1]] = _parse_value(value)


def parse_recipe(data: dict, path: Path | None = None) -> Recipe:
    unknown = set(data) - {"run", "stages"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown top-level key; allowed keys: run, stages")
    try:
        run = RunSection.model_validate(data.get("run", {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "run", list(RunSection.model_fields))) from None
    raw_stages = data.get("stages", [])
    if not isinstance(raw_stages, list) or not all(isinstance(s, dict) for s in raw_stages):
        raise ConfigError("stages: expected an array of tables ([[stages]])")
    stages, seen = [], set()
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        kind = raw.get("kind")
        if kind is None:
            raise ConfigError(f"{where}.kind: missing required key; one of: {', '.join(STAGE_KINDS)}")
        if kind not in STAGE_KINDS:
            raise ConfigError(f"{where}.kind: unknown stage kind {kind!r}; expected one of: {', '.join(STAGE_KINDS)}")
        name = raw.get("name", kind)
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigError(f"{where}.name: expected letters, digits, '-', '_' or '.' (not starting with '.', "
                              f"at most 64; it names the stage's folder in the run dir), got {json.dumps(name)}")
        if name in seen:
            raise ConfigError(f"{where}.name: duplicate stage name {name!r}")
        seen.add(name)
        inp = raw.get("input")
        if inp is not None and not isinstance(inp, str):
            raise ConfigError(f"{where}.input: expected \"previous\", \"@<stage>\" or a path, got {json.dumps(inp)}")
        if isinstance(inp, str) and inp.startswith("@") and inp[1:] not in seen:
            raise ConfigError(f"{where}.input: {inp!r} does not name an earlier stage")
        body = {k: v for k, v in raw.items() if k not in _RESERVED}
        for key, ref in _refs(body):  # a stage may name a file in its own output dir ("@me/stats.npz")
            if ref.split("/")[0] not in seen - {name} and not (ref.startswith(f"{name}/") and len(ref) > len(name) + 1):
                raise ConfigError(f"{where}.{key}: {'@' + ref!r} does not name an earlier stage")
        cfg = validate_config(stage_module(kind).Config, body, where)
        if "init_from" in type(cfg).model_fields and "model" in type(cfg).model_fields:
            from .stages.training import refuse_model_with_init

            first = i == 0 and inp is None  # "previous" names no stage
            init = None if cfg.init_from in (None, "") or (cfg.init_from == "previous" and first) else cfg.init_from
            refuse_model_with_init(cfg, init, f"{where}.")
        stages.append(Stage(i, name, kind, inp, cfg))
    return Recipe(path, run, stages)


def _refs(body: dict):
    """``(key, ref)`` for every ``"@stage[/sub/path]"`` string value (top level or in a list)."""
    for k, v in body.items():
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, str) and item.startswith("@"):
                yield k, item[1:]


def resolve_refs(cfg, run_dir: Path):
    """The stage config with every ``"@stage/sub/path"`` value replaced by ``<run_dir>/stage/sub/path``:
    any stage can point a setting (a VAE, a decoder, a data dir) at an earlier stage's output."""
    def fix(v):
        if isinstance(v, str) and v.startswith("@"):
            return str(run_dir / v[1:])
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    update = {k: fix(getattr(cfg, k)) for k in type(cfg).model_fields if k != "input"}
    return cfg.model_copy(update={k: v for k, v in update.items() if v != getattr(cfg, k)})


def resolve_stage(recipe: Recipe, stage: Stage, ctx: StageContext):
    """The config a recipe stage runs with, everything the recipe decides made explicit: ``"@stage"``
    values (:func:`resolve_refs`), ``"previous"`` (and an unset ``data`` / ``checkpoint``) as the
    previous stage's output dir (``config.PREVIOUS_OR_PATH``), an unset ``seed`` as the run's seed,
    an unset ``threads`` as ``[run] threads``. The stage runs this config and the run report prints
    it as the standalone command, so the command does what the recipe stage did."""
    cfg = resolve_refs(stage.config, ctx.run_dir)
    update = {}
    for name, field in type(cfg).model_fields.items():
        marker, value = field.json_schema_extra, getattr(cfg, name)
        if marker not in (PREVIOUS_OR_PATH, UNSET_IS_PREVIOUS) or ctx.previous is None:
            continue
        if value == "previous" or (value is None and marker == UNSET_IS_PREVIOUS):
            update[name] = str(ctx.previous)
    if "seed" in type(cfg).model_fields and cfg.seed is None:
        update["seed"] = recipe.run.seed
    if cfg.threads is None and recipe.run.threads is not None:
        update["threads"] = recipe.run.threads
    return cfg.model_copy(update=update) if update else cfg


def load_recipe(path: Path, overrides: tuple[str, ...] = ()) -> Recipe:
    data = read_toml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_recipe(data, Path(path))


# ---------------------------------------------------------------------------------------
# Running.

def select_stages(recipe: Recipe, start: str | None, only: str | None, run_dir: Path | None = None) -> list[Stage]:
    """The stages to run: all, ``--only`` one, or ``--from`` one on; ``--from`` needs every
    earlier stage done (its done-marker in ``run_dir``)."""
    if start and only:
        raise ConfigError("--from and --only cannot be used together")
    if only:
        return [recipe.stage(only)]
    if start:
        first = recipe.stage(start).index
        if run_dir is not None:
            missing = [s.name for s in recipe.stages[:first] if not (run_dir / s.name / DONE_MARKER).is_file()]
            if missing:
                raise ConfigError(f"--from {start}: earlier stage(s) {', '.join(missing)} not done in {run_dir}; "
                                  f"run them first (e.g. --from {missing[0]})")
        return recipe.stages[first:]
    return list(recipe.stages)


def _context(recipe: Recipe, stage: Stage, run_dir: Path, dry_run: bool, console) -> StageContext:
    prev = run_dir / recipe.stages[stage.index - 1].name if stage.index > 0 else None
    ctx = StageContext(out_dir=run_dir / stage.name, previous=prev, run_dir=run_dir,
                       seed=recipe.run.seed, dry_run=dry_run, console=console)
    if stage.input not in (None, "previous"):
        ctx.previous = ctx.resolve_input(stage.input)
    return ctx


def plan_recipe(recipe: Recipe, run_dir: Path, stages: list[Stage], console) -> list[dict]:
    """Every stage's plan, in order; what a plan provides (latent space, text encoders, UNet
    config) reaches the later stages' plans through ``ctx.planned``."""
    rows, planned = [], {}
    for st in stages:
        ctx = _context(recipe, st, run_dir, True, console)
        ctx.planned = planned
        provides = {}
        for item in st.module.plan(resolve_stage(recipe, st, ctx), ctx):
            provides |= item.provides
            rows.append(dict(stage=st.name, kind=st.kind, **{k: v for k, v in item.__dict__.items() if k != "provides"}))
        planned[str(ctx.out_dir)] = provides
    return rows


def remove_stage_dir(path: Path, run_dir: Path) -> None:
    """Delete a stage's output dir, refusing anything that does not resolve to a folder strictly
    inside ``run_dir`` (a symlink or a crafted name can never reach outside the run)."""
    target, root = Path(path).resolve(), Path(run_dir).resolve()
    if target == root or root not in target.parents:
        raise ConfigError(f"refusing to delete {path}: it resolves to {target}, not a folder inside the run dir {root}")
    if target.exists():
        shutil.rmtree(target)


def _changed_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def check_done_stages(stages: list[Stage], run_dir: Path) -> None:
    """A finished stage whose settings changed since it ran is an error naming the keys and the
    fix: it is never silently skipped, and never silently redone (its outputs may be days of
    training)."""
    for st in stages:
        marker = run_dir / st.name / DONE_MARKER
        if not marker.is_file():
            continue
        recorded = json.loads(marker.read_text()).get("config", {})
        changed = [k for k in _changed_keys(recorded, st.config.model_dump(mode="json")) if k not in RUNTIME_KEYS]
        if changed:
            k = changed[0]
            raise ConfigError(f"stage {st.name!r} ran with other settings ({', '.join(changed)}; {k}: "
                              f"{json.dumps(recorded.get(k))} then, {json.dumps(st.config.model_dump(mode='json').get(k))} "
                              f"now); redo it and the stages after it with --fresh --from {st.name}, "
                              f"or restore the settings")


def run_one_stage(module_name: str, kind: str, recorded: dict, cfg, ctx: StageContext) -> dict:
    """Run one stage with its resolved ``cfg`` and mark it done (atomically): the record stored in
    ``<stage>/.snapgen-done.json`` (``recorded``: the recipe's settings, checked on re-runs; its wall
    time, start time and threads)."""
    from .cpu import resolve_threads

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    started, t0 = time.time(), time.perf_counter()
    summary = run_stage(importlib.import_module(module_name), cfg, ctx)
    # started_at (epoch seconds) and threads: the run report's timeline (which stages ran side by side)
    record = dict(summary=summary, wall_s=round(time.perf_counter() - t0, 3), started_at=round(started, 3),
                  threads=resolve_threads(cfg.threads)[0], kind=kind, config=recorded)
    if is_main_process():  # under a distributed launch: the main process's record, once
        atomic_write_json(ctx.out_dir / DONE_MARKER, record)
    wait_for_everyone()
    return record


def run_recipe(recipe: Recipe, run_dir: Path, stages: list[Stage], console, fresh: bool = False,
               jobs: int | None = None) -> list[dict]:
    """Run ``stages``; skip those already marked done (unless ``fresh``). A finished stage of the
    recipe that is not redone here and whose settings changed is an error
    (:func:`check_done_stages`): the stages after it would read stale outputs. ``jobs`` (default
    ``[run] jobs``, or 1 in a distributed launch, whose processes run every stage together): how many
    stages may run at once, each after the stages it reads (``schedule.py``); 1 runs them in order in
    this process."""
    check_done_stages([s for s in recipe.stages if not (fresh and s in stages)], run_dir)
    world = launched_processes()
    if world > 1 and jobs is None and recipe.run.jobs > 1:  # the recipe's jobs are for a single-process run
        console.print(f"[dim]one of {world} processes of a distributed launch: the stages run one at a time "
                      f"([run] jobs = {recipe.run.jobs} applies to a single-process `snapgen run`)[/dim]")
        jobs = 1
    jobs = jobs or recipe.run.jobs
    if jobs > 1 and world > 1:  # every rank would start its own workers
        raise ConfigError(f"jobs = {jobs}: this is one of {world} processes of a distributed launch (WORLD_SIZE); "
                          "stages run side by side only in a single-process `snapgen run`: use --jobs 1 here")
    contexts = {st.name: _context(recipe, st, run_dir, False, console) for st in stages}
    configs = {st.name: resolve_stage(recipe, st, contexts[st.name]) for st in stages}
    todo, t_run = [], time.perf_counter()
    for n, st in enumerate(stages, 1):
        marker = contexts[st.name].out_dir / DONE_MARKER
        if marker.is_file() and not fresh:
            console.print(f"[dim][{n}/{len(stages)}] {st.name}: done already, skipped[/dim]")
            continue
        if fresh and is_main_process():  # start over: the stage's old outputs and checkpoints go
            remove_stage_dir(contexts[st.name].out_dir, run_dir)
        todo.append(st)
    wait_for_everyone()
    if jobs > 1 and len(todo) > 1:
        from .schedule import run_parallel

        run_parallel(recipe, run_dir, todo, console, jobs, contexts, configs)
    else:
        for st in todo:
            console.rule(f"[bold][{st.index + 1}/{len(recipe.stages)}] {st.name}[/bold] ({st.kind})")
            run_one_stage(st.module.__name__, st.kind, st.config.model_dump(mode="json"), configs[st.name],
                          contexts[st.name])
    from .report import standalone_command, write_run_report

    # The report covers the whole run dir: the stages run or selected now, and every other stage
    # of the recipe done before (a `--from` / `--only` run keeps the earlier stages' figures).
    results, reported, commands = [], [], {}
    for st in recipe.stages:
        if st.name not in contexts:
            ctx = _context(recipe, st, run_dir, False, console)
            if not (ctx.out_dir / DONE_MARKER).is_file():
                continue
            contexts[st.name], configs[st.name] = ctx, resolve_stage(recipe, st, ctx)
        record = json.loads((contexts[st.name].out_dir / DONE_MARKER).read_text())
        reported.append({**record, "stage": st.name, "skipped": st not in todo})
        if st in stages:
            results.append(reported[-1])
        commands[st.name] = standalone_command(st.kind, configs[st.name], run_dir / st.name)
    elapsed = time.perf_counter() - t_run if todo else None
    if not is_main_process():
        return results
    report = write_run_report(run_dir, recipe.run.name, reported, commands, elapsed_s=elapsed, jobs=jobs)
    console.print(f"[bold]report:[/bold] {run_dir / 'report.md'} (stages {report['total_wall_s']:.1f} s"
                  + (f", elapsed {elapsed:.1f} s for {len(todo)} with {jobs} jobs)" if elapsed and jobs > 1 else ")"))
    return results


__all__ = ["STAGE_KINDS", "Recipe", "Stage", "PlanItem", "load_recipe", "parse_recipe", "plan_recipe",
           "run_recipe", "select_stages", "apply_override", "validate_config", "format_validation_error"]
