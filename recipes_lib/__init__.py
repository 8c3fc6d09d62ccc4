"""recipes_lib: measured recipes that make large language models train and run faster in less memory.

Modules, in the order data flows: ``hardware`` -> ``models``/``tasks``/``data`` -> the techniques
(``qlora``, ``offload``, ``losses``) -> ``train`` -> ``measure``/``bench`` -> ``plots``/``results``.
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
