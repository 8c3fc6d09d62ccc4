"""The ``recipes`` command: the notebooks' recipes as one configured, resumable training run.

``config`` validates a YAML file (and ``key=value`` overrides) into a typed ``RunConfig`` before
anything loads; ``data`` turns a dataset into packed or padded micro-batches; ``trainer`` builds the
model for the method (full, LoRA, QLoRA) and drives the one training loop (``core.train``) with
``checkpoint`` (atomic saves, exact resume) and ``logs`` (JSONL, TensorBoard, duration); ``cli`` is
the command line (``recipes train CONFIG key=value ...``).
"""
