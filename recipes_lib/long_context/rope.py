"""RoPE extension: raise a model's position limit by scaling its rotary frequencies (linear or YaRN).

transformers 5.x keeps the rotary settings in ``config.rope_parameters`` (``rope_type``, ``rope_theta``,
``factor``, ``original_max_position_embeddings``); ``rope_scaling`` is its deprecated alias, and the
only field before 5.0. The factor is always counted from the length the model was trained at, so
extending twice gives the same frequencies as extending once. A model's rotary embedding computes
its frequencies when built, so ``extend_context`` on a model rebuilds that module too, and remembers
the settings it replaced, so that ``restore_context`` can put them back.
"""

from __future__ import annotations

import copy

import torch

from ..core.errors import RecipeError

KINDS = ("yarn", "linear", "llama3")
_BEFORE = "_rope_before_extension"  # on an extended model: the config's settings extend_context replaced


def _parameters(config) -> dict:
    """The config's rotary settings as one flat dict (``rope_type``, ``rope_theta``, any scaling keys)."""
    if hasattr(config, "rope_parameters"):  # transformers >= 5.0
        params = dict(config.rope_parameters or {})
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10_000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    if any(isinstance(value, dict) for value in params.values()):
        raise RecipeError("extend_context: this model has one RoPE per layer type (nested "
                          "rope_parameters); it supports one global RoPE only: extend it by hand")
    return params


def default_kind(config) -> str:
    """The extension a model calls for: ``"llama3"`` if already llama3-scaled (Llama 3.x), else ``"yarn"``."""
    return "llama3" if _parameters(config)["rope_type"] == "llama3" else "yarn"


def trained_length(config) -> int:
    """The length the model's rotary frequencies were trained for (before any scaling)."""
    params = _parameters(config)
    if "original_max_position_embeddings" in params:
        return int(params["original_max_position_embeddings"])
    if params["rope_type"] == "linear":
        return round(config.max_position_embeddings / params["factor"])
    return int(config.max_position_embeddings)


def scaled_parameters(config, new_max_positions: int, kind: str = "yarn", trained: int | None = None) -> dict:
    """The rotary settings that stretch ``config``'s trained length (or ``trained``) to
    ``new_max_positions``."""
    if kind not in KINDS:
        raise RecipeError(f"kind={kind!r}: RoPE extension is one of {', '.join(KINDS)} "
                          f"(yarn keeps the high frequencies; linear divides every position)")
    params = _parameters(config)
    current = params["rope_type"]
    base = {"rope_type": kind, "rope_theta": params["rope_theta"]}
    if "partial_rotary_factor" in params:
        base["partial_rotary_factor"] = params["partial_rotary_factor"]
    if kind == "llama3" or current == "llama3":
        if trained is not None:
            raise RecipeError("trained= sets the length a default, linear or yarn RoPE was trained at; a "
                              "llama3-scaled RoPE names its own (original_max_position_embeddings)")
        if kind != current:
            raise RecipeError(f"kind={kind!r} on a model whose RoPE is {current!r}-scaled: llama3 "
                              f"scaling extends only a llama3-scaled model (Llama 3.x), and replacing "
                              f"it would change the frequencies it was trained with; pass "
                              f"kind={'llama3' if current == 'llama3' else 'yarn'!r}")
        factor = params["factor"] * new_max_positions / config.max_position_embeddings
        keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return _checked({**base, **{k: params[k] for k in keys}, "factor": factor}, new_max_positions)
    if current not in ("default", "linear", "yarn"):
        raise RecipeError(f"extend_context: this model's RoPE is {current!r}-scaled; only default, "
                          f"linear, yarn and llama3 RoPE can be extended: extend it by hand")
    original = trained_length(config) if trained is None else positive_tokens(trained, "trained")
    scaled = {**base, "factor": new_max_positions / original}
    if kind == "yarn":
        scaled["original_max_position_embeddings"] = original
    return _checked(scaled, new_max_positions)


def _checked(params: dict, new_max_positions: int) -> dict:
    if params["factor"] < 1:
        raise RecipeError(f"new_max_positions={new_max_positions} gives a RoPE factor of "
                          f"{params['factor']:.3g} < 1: extension only lengthens the context; "
                          f"pass at least the trained length")
    return params


def positive_tokens(value, name: str) -> int:
    """``value`` if it is a positive whole number of tokens, else a RecipeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{name}={value!r}: pass a positive whole number of tokens")
    return value


def extend_context(config_or_model, new_max_positions: int, kind: str = "yarn", trained: int | None = None):
    """Scale RoPE so positions up to ``new_max_positions`` fit; returns the config, changed in place.

    Args:
        config_or_model: a transformers config, or a model (its rotary embeddings are rebuilt too).
        kind: ``"yarn"`` (high frequencies kept, low ones stretched, attention rescaled),
            ``"linear"`` (every position divided by the factor) or ``"llama3"`` (a larger factor
            for a model already llama3-scaled, such as Llama 3.2).
        trained: the length the model was trained at where its config allows more than it saw (the
            embedded model's limit is 2048 positions, its rows were 256 tokens): the factor and YaRN's
            ``original_max_position_embeddings`` count from it. Default: ``trained_length(config)``.
    """
    new_max_positions = positive_tokens(new_max_positions, "new_max_positions")
    model = config_or_model if isinstance(config_or_model, torch.nn.Module) else None
    config = model.config if model is not None else config_or_model
    params = scaled_parameters(config, new_max_positions, kind, trained)
    if model is not None and _BEFORE not in vars(model):
        vars(model)[_BEFORE] = {key: copy.deepcopy(getattr(config, key)) for key in _settings(config)}
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = params
    else:
        config.rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    config.max_position_embeddings = new_max_positions
    if hasattr(config, "validate_rope"):
        config.validate_rope()
    if model is not None:
        _rebuild_rotary(model, config)
    return config


def restore_context(model: torch.nn.Module) -> bool:
    """Undo ``extend_context`` on ``model``: its own rotary settings and position limit again, its rotary
    embeddings rebuilt from them; returns whether there was an extension to undo."""
    before = vars(model).pop(_BEFORE, None)
    if before is None:
        return False
    for key, value in before.items():
        setattr(model.config, key, value)
    _rebuild_rotary(model, model.config)
    return True


def original_limit(model: torch.nn.Module) -> int:
    """``model``'s position limit before any ``extend_context`` on it."""
    before = vars(model).get(_BEFORE)
    return int((before or {}).get("max_position_embeddings", model.config.max_position_embeddings))


def _settings(config) -> tuple[str, ...]:
    rope_keys = ("rope_parameters",) if hasattr(config, "rope_parameters") else ("rope_scaling", "rope_theta")
    return (*rope_keys, "max_position_embeddings")


def _rebuild_rotary(model: torch.nn.Module, config) -> None:
    """Replace every rotary embedding module by one computed from the new config."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "inv_freq"):
                fresh = type(child)(config=config).to(child.inv_freq.device)
                setattr(parent, name, fresh)
