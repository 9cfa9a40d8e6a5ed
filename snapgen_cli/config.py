"""The base of every typed config (stage configs, loop settings, encoder specs): a leaf module."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel, ConfigDict, model_validator


def _optional(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


class StageConfig(BaseModel):
    """Base of every stage's typed config: unknown keys are errors, values are validated.

    TOML has no null, so an optional setting is unset with the string ``"none"`` (or
    ``"null"``), in a recipe and on the command line alike (``--keep-checkpoints none``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _none_words(cls, data):
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {k: None if (isinstance(v, str) and v.strip().lower() in ("none", "null") and k in fields
                                and _optional(fields[k].annotation)) else v for k, v in data.items()}
        return data
