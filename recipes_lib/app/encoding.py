"""Raw rows to scored token ids: prompt/response pairs, chat conversations and plain text.

Labels follow the model's convention (aligned with ``input_ids``; the model shifts them), with
``IGNORE_INDEX`` on tokens that are not scored: the prompt (``<bos> prompt response <eos>``, as
``core.batches.encode`` writes it, scores the response and eos), the non-assistant turns of a chat,
and the leading ``<bos>`` always.
"""

from __future__ import annotations

import hashlib
import json

from ..core.batches import Document
from ..core.dataload import document_ids
from ..core.errors import RecipeError
from ..core.losses import IGNORE_INDEX


def encode_rows(batch: dict, tokenizer, fmt: str, columns: dict[str, str], train_on_prompt: bool) -> dict:
    """A batch of raw rows (``datasets``' batched ``map``) as ``input_ids`` and ``labels``.

    Args:
        fmt: ``prompt_response``, ``chat`` or ``text``.
        columns: the column of each part: ``prompt``, ``response``, ``messages``, ``text``.
    Rows with nothing to score (no response, no text, no assistant turn) are dropped.
    """
    if fmt == "chat":
        encoded = [chat_document(m, tokenizer, train_on_prompt) for m in batch[columns["messages"]]]
        docs = [d for d in encoded if d is not None]
    elif fmt == "text":
        texts = [str(t) for t in batch[columns["text"]] if t is not None and str(t).strip()]
        tokens = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        framed = [document_ids(t, tokenizer) for t in tokens]
        docs = [Document(ids, [IGNORE_INDEX] + ids[1:]) for ids in framed]
    else:
        pairs = [("" if p is None else str(p), str(r)) for p, r in zip(batch[columns["prompt"]],
                 batch[columns["response"]]) if r is not None and str(r).strip()]
        # "<prompt> <response>" as core.batches.encode writes it, unless the data has its own separator.
        responses = [r if (not p or p[-1].isspace() or r[0].isspace()) else " " + r for p, r in pairs]
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"] if pairs else []
        answers = tokenizer(responses, add_special_tokens=False)["input_ids"] if pairs else []
        has_eos = tokenizer.eos_token_id is not None
        docs = []
        for prompt, answer in zip(prompts, answers):
            ids = document_ids(prompt + answer, tokenizer)
            n_masked = 1 if train_on_prompt else len(ids) - len(answer) - has_eos
            docs.append(Document(ids, [IGNORE_INDEX] * n_masked + ids[n_masked:]))
    return {"input_ids": [d.input_ids for d in docs], "labels": [d.labels for d in docs]}


def chat_document(messages, tokenizer, train_on_prompt: bool = False) -> Document | None:
    """One conversation through the chat template; labels on the assistant turns (every token but the
    first if ``train_on_prompt``); None when it has no assistant turn.

    An assistant turn's characters lie between the template of the turns before it (with the generation
    prompt, so the assistant header is not scored) and the template through it (so its end-of-turn
    marker is); a token is scored when it starts there. The full text is tokenised once, so a token
    merged across a turn boundary is counted once.
    """
    if not messages or not any(m.get("role") == "assistant" and m.get("content") for m in messages):
        return None
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = (tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                  if i else "")
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise RecipeError("the chat template renders a conversation differently from its beginning, so "
                              "assistant turns cannot be located: use a template whose prefixes are stable, "
                              "or format: prompt_response")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if train_on_prompt:
        return Document(ids, [IGNORE_INDEX] + ids[1:])
    scored = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
    return Document(ids, [t if s else IGNORE_INDEX for t, s in zip(ids, scored)])


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the fast tokenizer's definition (less per-call padding/truncation),
    the special ids and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {"vocab": tokenizer.get_vocab()}
    state.pop("padding", None)
    state.pop("truncation", None)
    template = getattr(tokenizer, "chat_template", None)
    state["specials"] = [tokenizer.bos_token_id, tokenizer.eos_token_id, template]
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
