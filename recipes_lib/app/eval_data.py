"""What ``recipes eval`` scores: the models (a run's base and fine-tune, or a model) and the held-out rows.

``target`` reads a run folder (its saved config names the base model and the data it trained on) or
takes a model name. ``held_out`` gives the rows to score: of a run's own data, its validation split,
found by the very functions ``recipes train`` split it with (``data.load_documents`` and
``data.split_documents``), less any row whose prompt also appears among the training rows; of other
data, every row. Each row comes with its tokenised document (for perplexity), the token ids of its
prompt (for generation) and its reference answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pydantic
import torch

from ..core import hardware, models
from ..core.batches import Document
from ..core.errors import RecipeError
from ..memory import qlora
from . import checkpoint, data, fast_path, preflight, trainer
from .config import RunConfig
from .encoding import encode_rows

TRAINED = ("adapter", "merged", "model")  # what a run folder holds after `recipes train`
NOT_LOCAL = "run folder or model (there is no such folder; tried as a hub id)"


@dataclass
class Target:
    """What to evaluate: a run (``config`` set, ``trained`` its model folder) or a model by name."""

    name: str
    base: str | None
    config: RunConfig | None = None
    trained: Path | None = None


@dataclass
class Rows:
    """Held-out rows: documents, prompts (token ids, none for plain text), references, tasks."""

    docs: list[Document]
    prompts: list[list[int] | None]
    references: list[str | None]
    prompt_texts: list[str]
    tasks: list[str | None]
    note: str
    excluded: int = 0
    extra: dict = field(default_factory=dict)


def target(name: str, base: str | None = None) -> Target:
    """The run folder or the model ``name``; a run's base comes from its saved config."""
    path = Path(name).expanduser()
    preflight.local_model(base, "--base")
    if path.is_dir() and not _is_run(path) and not _is_model(path):
        run = f"the run folder {path.parent}" if (path / "state.pt").is_file() else "its run folder"
        raise RecipeError(f"{name} is neither a `recipes train` run (no checkpoint-*/, adapter/ or model/ in "
                          f"it) nor a model folder (no config.json or adapter_config.json): pass {run}, "
                          "a model folder, or a hub id")
    if path.is_dir() and ((path / "config.json").is_file() or not _is_run(path)):
        return Target(name, base)  # a model folder (or a folder the model loader will judge)
    if path.is_dir():
        trained = next((path / t for t in TRAINED if (path / t).is_dir()), None)
        if trained is None:
            raise RecipeError(f"the run folder {name} holds no trained model (no adapter/, merged/ or "
                              "model/): let `recipes train` finish, or resume it with checkpoint.resume=true")
        return Target(name, base or _run_base(path, trained), _run_config(path), trained)
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or path.suffix:
        raise RecipeError(f"no run folder or model at {name!r}: pass the output.dir of a `recipes train` "
                          "run, a model folder, or a hub id such as 'HuggingFaceTB/SmolLM2-135M'")
    preflight.local_model(name, "target")  # a near miss of a local folder, not a hub id
    return Target(name, base)


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def _is_run(path: Path) -> bool:
    return any((path / f).exists() for f in (*TRAINED, "metrics.jsonl", "training_duration.json")) or \
        bool(checkpoint.checkpoints(path))


def _run_config(path: Path) -> RunConfig | None:
    last = checkpoint.latest(path)
    if last is None:
        return None
    state = torch.load(last / "state.pt", weights_only=False)
    cfg = RunConfig.model_validate(state["config"])
    base = checkpoint.saved_nf4_base(state)  # the base the run held, whatever "auto" would pick here
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"nf4_base": base})}) if base else cfg


def _run_base(path: Path, trained: Path) -> str | None:
    cfg = _run_config(path)
    if cfg is not None:
        return cfg.model.source
    adapter = trained / "adapter_config.json"
    return json.loads(adapter.read_text()).get("base_model_name_or_path") if adapter.is_file() else None


def load(name: str, what: str, loader):
    """``loader()``, any failure turned into one RecipeError that names the model."""
    lead = (f"there is no run folder or model folder at {name!r}, and as a hub id it does not load"
            if what == NOT_LOCAL else f"the {what} {name!r} does not load")
    try:
        return loader()
    except RecipeError as error:
        raise RecipeError(f"{lead}: {error}") from None
    except Exception as error:  # transformers' and peft's many error types
        raise RecipeError(f"{lead} ({type(error).__name__}: {error}): give a model folder saved by "
                          "save_pretrained, a hub id, or a `recipes train` run folder") from None


def base_model(tgt: Target):
    """The base model, loaded as the run trained it (QLoRA: on the 4-bit base it held, ``nf4_base``)."""
    if tgt.config is None or tgt.config.model.method != "qlora":
        return load(tgt.base, "base model", lambda: models.load_model(tgt.base).eval())
    hw = hardware.detect()
    base = tgt.config.model.nf4_base  # "auto": a run saved before the base was recorded; resolved here
    base = fast_path.nf4_base_choice(tgt.config, hw)[0] if base == "auto" else base
    return load(tgt.base, "base model", lambda: qlora.quantized_base(tgt.base, base, hw).eval())


def tuned_model(tgt: Target):
    """The fine-tuned model: the base with the run's adapters, or the saved full/merged model."""
    if tgt.trained is None:
        what = "model" if Path(tgt.name).expanduser().exists() else NOT_LOCAL
        return load(tgt.name, what, lambda: models.load_model(tgt.name).eval())
    if tgt.trained.name == "adapter":
        return load(str(tgt.trained), "fine-tuned model",
                    lambda: qlora.load_adapter(base_model(tgt), tgt.trained).eval())
    return load(str(tgt.trained), "fine-tuned model", lambda: models.load_model(str(tgt.trained)).eval())


def tokenizer_of(tgt: Target):
    """The run's tokenizer (saved beside its trained model), or the model's."""
    if tgt.config is not None and tgt.trained is None:
        return trainer.tokenizer_for(tgt.config)
    source = str(tgt.trained or tgt.name)
    what = "tokenizer of" if Path(source).expanduser().exists() else NOT_LOCAL
    return load(source, what, lambda: models.load_tokenizer(source))


def data_config(tgt: Target, updates: dict) -> tuple[data.DataConfig, bool]:
    """The data to score and whether it is the run's own (then its validation split is the held-out set)."""
    given = {k: v for k, v in updates.items() if v is not None}
    if tgt.config is None and "source" not in given:
        raise RecipeError(f"{tgt.name} is a model, not a run folder: give the data to score with --data")
    start = tgt.config.data.model_dump() if tgt.config is not None else {}
    try:
        cfg = data.DataConfig.model_validate({**start, **given})
    except pydantic.ValidationError as error:
        raise RecipeError("; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: "
                                    f"{e['msg'].removeprefix('Value error, ')}" for e in error.errors())
                          ) from None
    run_data = tgt.config.data if tgt.config is not None else None
    own = run_data is not None and (cfg.source, cfg.split) == (run_data.source, run_data.split)
    if own and cfg.validation_fraction == 0:
        raise RecipeError(f"the run {tgt.name} held nothing out (data.validation_fraction: 0), so every "
                          f"row of {cfg.source} was trained on: give held-out rows with --data")
    return (cfg if own else cfg.model_copy(update={"validation_fraction": 0.0})), own


def held_out(cfg: data.DataConfig, tokenizer, own: bool) -> Rows:
    """The rows to score (see the module docstring)."""
    train_docs, val_docs = data.load_documents(cfg, tokenizer)  # checks the columns, splits as training did
    table = data.load_table(cfg)
    if cfg.max_examples is not None:
        table = table.select(range(min(cfg.max_examples, len(table))))
    kept = [i for i in range(len(table)) if _scored(table[i], cfg, tokenizer)]
    train_idx, val_idx = data.split_documents(kept, cfg.validation_fraction, cfg.seed)
    docs, rows = (val_docs, val_idx) if own else (train_docs, train_idx)
    if len(docs) != len(rows):
        raise RecipeError(f"{cfg.source}: {len(rows)} rows but {len(docs)} documents; this is a bug, "
                          "please report it")
    excluded = 0
    if own:  # a held-out row whose prompt was also trained on is not held out
        seen = {_prompt_text(table[i], cfg) for i in train_idx}
        keep = [k for k, i in enumerate(rows) if _prompt_text(table[i], cfg) not in seen]
        excluded = len(rows) - len(keep)
        docs, rows = [docs[k] for k in keep], [rows[k] for k in keep]
    if not rows:
        raise RecipeError(f"no held-out rows left in {cfg.source}: give more data or a larger "
                          "validation_fraction")
    records = [table[i] for i in rows]
    prompts = [_prompt_ids(r, cfg, tokenizer) for r in records]
    how = (f"the run's validation split ({cfg.validation_fraction:g} of the rows, seed {cfg.seed}), less "
           f"{excluded} whose prompt is also a training row's" if own else "every row")
    return Rows(docs, [p for p, _ in prompts], [ref for _, ref in prompts],
                [_prompt_text(r, cfg) for r in records], [r.get("task") for r in records], how, excluded)


def _columns(cfg: data.DataConfig) -> dict[str, str]:
    return {"prompt": cfg.prompt_column, "response": cfg.response_column, "messages": cfg.messages_column,
            "text": cfg.text_column}


def _scored(row: dict, cfg: data.DataConfig, tokenizer) -> bool:
    """Whether ``recipes train`` keeps this row (the same function decides)."""
    batch = {column: [value] for column, value in row.items()}
    return bool(encode_rows(batch, tokenizer, cfg.format, _columns(cfg), cfg.train_on_prompt)["input_ids"])


def _prompt_text(row: dict, cfg: data.DataConfig) -> str:
    if cfg.format == "prompt_response":
        return str(row[cfg.prompt_column] or "")
    if cfg.format == "chat":
        return json.dumps(_before_last_answer(row[cfg.messages_column])[0])
    return str(row[cfg.text_column])


def _before_last_answer(messages: list[dict]) -> tuple[list[dict], str]:
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("content"))
    return messages[:last], messages[last]["content"]


def _prompt_ids(row: dict, cfg: data.DataConfig, tokenizer) -> tuple[list[int] | None, str | None]:
    """(prompt token ids, reference answer) of a row; (None, None) for plain text (perplexity only)."""
    if cfg.format == "text":
        return None, None
    if cfg.format == "chat":
        before, answer = _before_last_answer(row[cfg.messages_column])
        text = tokenizer.apply_chat_template(before, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], str(answer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = "" if row[cfg.prompt_column] is None else str(row[cfg.prompt_column])
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"], str(row[cfg.response_column])
