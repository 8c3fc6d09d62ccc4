"""Knowledge distillation: train a smaller student on its teacher's output distribution.

The student minimises ``kl_weight · T² · KL(p_teacher^T || p_student^T) + (1 - kl_weight) · CE``
where ``p^T = softmax(logits / T)``. The teacher's full distribution says, at every position, how
plausible each *wrong* token is too: far more signal per token than the one-hot label of plain
cross-entropy, so the student learns faster from the same data. ``T²`` keeps the gradient scale
independent of the temperature (Hinton et al., 2015).

The student here is the teacher with fewer layers, its layers initialised from evenly spaced
teacher layers (as DistilBERT does): decoding time falls with the number of layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core import train
from ..core.errors import RecipeError
from ..core.losses import IGNORE_INDEX, shift_labels
from ..core.models import count_parameters


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers for the student, first and last included: 4 -> 2 gives [0, 3]."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def make_student(teacher, num_layers: int, init_from_teacher: bool = True, seed: int = 0, **config_overrides):
    """The teacher's architecture with ``num_layers`` layers (and any other config field overridden).

    Args:
        init_from_teacher: copy embeddings, final norm, LM head and evenly spaced layers from the
            teacher (only when the widths match); otherwise a random initialisation.
    Raises:
        RecipeError: if the student would not be smaller than its teacher.
    """
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = num_layers
    for key, value in config_overrides.items():
        setattr(config, key, value)
    student = build_student(teacher, config, seed)
    if init_from_teacher:
        _copy_from_teacher(student, teacher, layer_map(teacher.config.num_hidden_layers, num_layers))
    return student


def depth_pair(teacher, fraction: float) -> tuple:
    """``teacher`` and its ``make_student`` with ``fraction`` of its layers (rounded, at least one)."""
    return teacher, make_student(teacher, max(1, round(teacher.config.num_hidden_layers * fraction)))


def build_student(teacher, config, seed: int = 0):
    """A randomly initialised model of ``teacher``'s class with ``config``, on the teacher's device and in
    its dtype. Raises RecipeError if it would not be smaller than its teacher."""
    if getattr(config, "layer_types", None) is not None:  # newer configs list one attention type per layer
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    torch.manual_seed(seed)
    param = next(teacher.parameters())
    student = type(teacher)(config).to(device=param.device, dtype=param.dtype)
    n_student, n_teacher = count_parameters(student)[1], count_parameters(teacher)[1]
    if n_student >= n_teacher:
        raise RecipeError(f"the student ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                          f"{n_student:,} parameters) is not smaller than its teacher "
                          f"({teacher.config.num_hidden_layers} layers, {n_teacher:,}): distillation makes a "
                          f"model cheaper to run, so give the student fewer layers or a smaller width.")
    return student


def _copy_from_teacher(student, teacher, layers: list[int]) -> None:
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    prefix = "model.layers."
    for key in s_state:
        source = key
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            source = f"{prefix}{layers[int(index)]}.{rest}"
        if source not in t_state or t_state[source].shape != s_state[key].shape:
            raise RecipeError(f"cannot initialise the student from the teacher: {key} has no match of the "
                              f"same shape; use init_from_teacher=False for a student of another width")
        s_state[key] = t_state[source]
    student.load_state_dict(s_state)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
            temperature: float = 2.0, kl_weight: float = 0.5,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, cross-entropy, KL) summed over target tokens; ``kl_weight=0`` is plain cross-entropy."""
    targets = shift_labels(labels)
    valid = targets != IGNORE_INDEX
    s = student_logits[valid].float()
    ce = F.cross_entropy(s, targets[valid], reduction="sum")
    if kl_weight == 0:
        return ce, ce, torch.zeros_like(ce)
    t = teacher_logits[valid].float()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="sum") * temperature**2
    return kl_weight * kl + (1 - kl_weight) * ce, ce, kl


def distillation_loss(teacher, temperature: float = 2.0, kl_weight: float = 0.5,
                      ce_log: list | None = None) -> Callable:
    """The training loop's ``loss_fn``: ``(student, micro_batch) -> summed KL + CE`` against ``teacher``.

    ``ce_log``, if given, gets ``(summed cross-entropy, target tokens)`` of every micro-batch (tensors,
    detached: no host sync per step), so a distilled run's cross-entropy can be read beside a CE-only one.
    """
    def loss_fn(student, batch: dict) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                  "use_cache": False}
        teacher_logits = None
        if kl_weight > 0:
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
        logits = student(**inputs).logits
        total, ce, _ = kd_loss(logits, teacher_logits, batch["labels"], temperature, kl_weight)
        if ce_log is not None:
            ce_log.append((ce.detach(), (shift_labels(batch["labels"]) != IGNORE_INDEX).sum()))
        return total
    return loss_fn


def distill(student, teacher, batches, steps: int, lr: float = 1e-3, kl_weight: float = 0.5,
            temperature: float = 2.0, autocast_dtype: torch.dtype | None = None, progress: bool | None = None,
            desc: str = "distill", ce_per_step: list | None = None) -> list[float]:
    """Train ``student`` for ``steps`` batches against ``teacher`` with ``train.train``; returns the losses.

    AdamW (no weight decay), cosine schedule after a 5% warm-up, gradients clipped at 1.0;
    ``kl_weight=0`` trains on cross-entropy alone (the teacher is not run).

    Args:
        ce_per_step: if given, gets each step's cross-entropy per target token, the part of the loss
            that a distilled and a CE-only run share (their total losses are not comparable).
    """
    teacher.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    scheduler = train.cosine_schedule(optimizer, steps, warmup=max(1, steps // 20))
    log = [] if ce_per_step is not None else None
    stats = train.train(student, optimizer, batches, steps, autocast_dtype=autocast_dtype, max_grad_norm=1.0,
                        scheduler=scheduler, progress=progress, desc=desc,
                        loss_fn=distillation_loss(teacher, temperature, kl_weight, log))
    if log:  # one micro-batch per step
        ce_per_step += (torch.stack([ce for ce, _ in log]) / torch.stack([n for _, n in log])).tolist()
    return stats.losses


RUNS = {"distilled (KL + CE)": 0.5, "CE only": 0.0}  # name -> kl_weight


def kd_and_ce(student, teacher, make_batches: Callable, steps: int, runs: dict | None = None,
              **how) -> tuple[dict, dict]:
    """``distill`` a copy of ``student`` (the same initialisation) once per ``runs`` entry (name ->
    ``kl_weight``; default ``RUNS``: KL + CE and CE alone), each on ``make_batches()``, the same batches;
    ``how``: ``distill``'s other arguments. Returns ``({name: student}, {name: CE per target token per
    step})``."""
    students, curves = {}, {}
    for name, kl_weight in (runs or RUNS).items():
        students[name], curves[name] = copy.deepcopy(student), []
        distill(students[name], teacher, make_batches(), steps, kl_weight=kl_weight, desc=name,
                ce_per_step=curves[name], **how)
    return students, curves
