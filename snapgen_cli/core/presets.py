"""Named-preset registries (UNet, decoder, autoencoder): one lookup with one error message."""

from __future__ import annotations

import copy

from ..errors import ConfigError


def preset_config(presets: dict[str, dict], what: str, name: str, **overrides) -> dict:
    """A deep copy of preset ``name`` of ``presets`` with ``overrides`` applied; an unknown
    name is a ConfigError listing the choices."""
    if name not in presets:
        raise ConfigError(f"unknown {what} preset {name!r}; choose one of: {', '.join(presets)}")
    return {**copy.deepcopy(presets[name]), **overrides}
