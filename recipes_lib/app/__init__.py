"""The ``recipes`` command: the notebooks' recipes as one configured, resumable training run.

``config`` validates a YAML file (and ``key=value`` overrides) into a typed ``RunConfig`` before
anything loads; ``data`` turns a dataset into packed or padded micro-batches; ``trainer`` builds the
model for the method (full, LoRA, QLoRA) and drives the one training loop (``core.train``) with
``checkpoint`` (atomic saves, exact resume) and ``logs`` (JSONL, TensorBoard, duration); ``cli`` is
the command line (``recipes train CONFIG key=value ...``).
"""

import logging

# On a CPU with AVX512-BF16, importing bitsandbytes tries to fetch an optional CPU kernel from the hub and,
# offline or untrusted, logs a warning about trust_remote_code; its own CPU path then works. Not a line
# every `recipes` command should print.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
