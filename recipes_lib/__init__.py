"""recipes_lib: measured recipes that make large language models train and run faster in less memory.

Layers, imports pointing down only (recipes_lib/README.md draws them and says where a new technique goes):

- ``core``: errors, hardware, models, checkpointing, batches, tasks, losses, the one training loop;
- ``measure``: memory, timing, FLOPs, predictions, the bench harness, quality;
- techniques: ``memory`` (QLoRA, offload), ``parallel``, ``inference``, ``attention``, ``long_context``;
- on top: ``notebook`` (the notebooks' preamble and targets), ``plots``, ``results``.
"""

__version__ = "0.1.0"


def quiet() -> None:
    """Silence load-time progress bars and known-harmless library warnings (for notebooks)."""
    import warnings

    # escape sequences in some libraries' docstrings
    warnings.filterwarnings("ignore", category=SyntaxWarning)
    for pattern in (".*is deprecated and will be removed in v6.*", ".*use_reentrant.*",
                    ".*MatMul8bitLt: inputs will be cast.*", ".*torch_dtype.*",
                    ".*flex_attention called without torch.compile.*"):
        warnings.filterwarnings("ignore", message=pattern)

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
