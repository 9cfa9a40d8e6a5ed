"""The base of every typed config (stage configs, loop settings, encoder specs): a leaf module."""

from __future__ import annotations

import types
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

#: ``json_schema_extra`` of a setting that names another stage's output dir. In a recipe,
#: ``"previous"`` becomes the previous stage's output dir (``"@stage"`` that stage's, as for every
#: setting) before the stage sees its config, so the stage and its standalone command in the
#: run report get the same paths. ``UNSET_IS_PREVIOUS``: an unset value also means the previous
#: stage (``data``, ``checkpoint``); ``PREVIOUS_OR_PATH``: unset means none (``init_from``).
PREVIOUS_OR_PATH = {"stage_input": "previous"}
UNSET_IS_PREVIOUS = {"stage_input": "unset-is-previous"}


def _optional(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


class StageConfig(BaseModel):
    """Base of every typed config: unknown keys are errors, values are validated.

    TOML has no null, so an optional setting is unset with the string ``"none"`` (or
    ``"null"``), in a recipe and on the command line alike (``--keep-checkpoints none``).
    Except where unset means the previous stage (``UNSET_IS_PREVIOUS``): there ``"none"`` stays,
    and the stage reads it as "no input" (``snapgen eval --checkpoint none``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _none_words(cls, data):
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {k: None if (isinstance(v, str) and v.strip().lower() in ("none", "null") and k in fields
                                and _optional(fields[k].annotation)
                                and fields[k].json_schema_extra != UNSET_IS_PREVIOUS) else v for k, v in data.items()}
        return data


class StageSettings(StageConfig):
    """Base of every stage kind's ``Config``: the settings every stage has (one flag each, and a
    key of every recipe stage). ``threads`` is a runtime setting: it never changes what a stage
    computes beyond float rounding, so a finished stage is not redone for it (``RUNTIME_KEYS``)."""

    threads: PositiveInt | Literal["all"] | None = Field(
        None, description="CPU threads of torch (default: $OMP_NUM_THREADS, else the cores this process may use: "
                          "affinity mask and cgroup quota, divided among the processes of `accelerate launch`; "
                          "all: every available core)")


#: Stage settings that change how a stage runs, not what it writes (``compile``: torch.compile, float rounding).
RUNTIME_KEYS = frozenset({"threads", "compile"})
