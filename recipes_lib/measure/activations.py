"""Activation memory of one training micro-batch from the model's shape (the loss's: ``loss_memory``).

Counted tensor by tensor as autograd keeps them for backward in a Hugging Face Llama-style decoder
layer (RMSNorm, rotary embeddings, SDPA / flash / eager attention, SwiGLU MLP): each ``Term`` is
bytes per token with the formula that gives it. Which tensors are kept depends on a few facts of
the run (``Layout``): the compute dtype; the residual stream's dtype (fp32 when fp32 weights run
under bf16 autocast, whose casts give every linear layer its own bf16 copy of its input); whether
the weights train (a frozen norm keeps no normalised input) or carry LoRA adapters (peft's LoRA on a
bf16 base casts each adapter's input to fp32 and autocast casts it back: one copy per adapter);
the attention kernel (flash keeps ``q, k, v``, the output and a logsumexp, no ``seq^2`` term; with a
mask, SDPA repeats the key/value heads and keeps the mask it converts, per layer; eager keeps the
``heads x seq^2`` probabilities in fp32 and in the compute dtype). ``tests/test_estimate.py`` checks
these sums against the tensors autograd really saves.

A ``torch.compile``'d layer (``compiled``) keeps what AOTAutograd's min-cut partitioner (Inductor's
default) saves instead: a matmul's or attention's output, and any tensor a matmul or attention backward
reads (``ban_recompute_materialized_backward``), is saved; of the rest it saves the fewest bytes that
backward can recompute the cheap pointwise ops from (the min cut). So each RMSNorm
keeps an rsqrt, the first the layer's input, the second the o_proj output it recomputes the residual
sum ``x + o`` from (the fp32 upcasts and the normalised outputs are recomputed); each linear's input is
kept once (autocast's per-linear casts are one node after CSE); SwiGLU keeps gate and up, not
``silu(gate)``. With LoRA adapters on a frozen base it keeps the same, plus each adapter's rank-``r`` output
and, in bf16, the o adapter's own copy of the attention output (peft's cast of its input to the fp32
adapters is a new tensor beside the one attention's backward reads); peft's per-adapter copies of the
other inputs are one each after CSE.
Under checkpointing such a layer's recompute and backward run as one compiled graph, whose transient
tensors are not modelled: a recomputed compiled adapter layer keeps eager autograd's count
(``recomputed_terms``).

A tiled MLP (``tiled_mlp``, ``long_context.tiling``) keeps only its input: the ``[tokens, intermediate]``
tensors exist for one chunk at a time, while its backward recomputes that chunk (``tiled_mlp_backward``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .flops import gated_mlp, widths


@dataclass(frozen=True)
class Term:
    """``value`` bytes (per token where the caller says so), and how they come about."""

    name: str
    value: float
    formula: str


@dataclass(frozen=True)
class Layout:
    """What decides which tensors a layer keeps, and their sizes."""

    compute: int = 2              # bytes of an activation in the compute dtype (bf16 2, fp32 4)
    residual: int = 2             # bytes of the residual stream
    trainable: bool = True        # full fine-tuning: norms and linear weights train
    adapters: bool = False        # LoRA adapters on every decoder linear
    adapter_copies: bool = False  # each adapter keeps its own copy of its input (see module docstring)
    adapter_dropout: bool = False
    lora_r: int = 16
    attention: str = "sdpa"       # sdpa | flash_attention_2 | eager
    masked: bool = False          # packed documents (position_ids) or padding: a mask per attention call
    mlp: int = 2                  # bytes of the MLP's intermediates (bitsandbytes returns its input's dtype)
    compiled: bool = False        # torch.compile'd decoder layers (see the module docstring)
    tiled_mlp: bool = False       # the MLP computed in chunks of tokens, keeping only its input


@dataclass(frozen=True)
class Shape:
    """A decoder's widths: hidden, query, key/value, MLP, heads, head size, layers, vocabulary."""

    d: int
    q: int
    kv: int
    ffn: int
    heads: int
    head_dim: int
    layers: int
    vocab: int
    gated: bool

    @classmethod
    def of(cls, config) -> Shape:
        d, q, kv, ffn = widths(config)
        heads = config.num_attention_heads
        return cls(d, q, kv, ffn, heads, q // heads, config.num_hidden_layers, config.vocab_size,
                   gated_mlp(config))


def _inputs(s: Shape, lay: Layout) -> list[Term]:
    """What the linear layers keep of their inputs: norm outputs, attention output, MLP product."""
    if not (lay.trainable or lay.adapters):
        return []
    a, groups = lay.compute, [("q, k, v", s.d, 3), ("o", s.q, 1), ("gate, up", s.d, 2 if s.gated else 1),
                              ("down", s.ffn, 1)]
    cast = lay.residual != a  # fp32 residual under autocast: each linear casts its own copy
    terms = []
    if lay.tiled_mlp:  # the MLP's linears see one chunk at a time: the tiled function keeps the norm output
        groups = groups[:2]
        terms.append(Term("tiled MLP input (norm output, all it keeps)", lay.residual * s.d,
                          f"{lay.residual} x d({s.d})"))
    for name, width, n in groups:
        if lay.adapters and lay.adapter_dropout:  # each adapter drops out its own copy, and keeps the mask
            terms.append(Term(f"{name} adapter inputs after dropout", n * (a + 1) * width,
                              f"{n} x ({a}+1 mask) x {width}"))
        elif lay.adapter_copies or (cast and name in ("q, k, v", "gate, up")):
            terms.append(Term(f"{name} input copies", n * a * width, f"{n} x {a} x {width}"))
        elif name in ("q, k, v", "gate, up"):
            terms.append(Term(f"{name} input (norm output)", lay.residual * width,
                              f"{lay.residual} x {width}"))
        elif name == "down":
            terms.append(Term("down input (MLP product)", lay.mlp * width, f"{lay.mlp} x ffn({width})"))
    return terms  # "o" keeps the attention output, already counted with the attention


def compiled_modelled(lay: Layout) -> bool:
    """Whether the compiled formulas apply: full fine-tuning, or LoRA adapters without dropout on a frozen
    base, with a fused attention kernel (what notebooks 01 and 02 compile and the tests check); adapter
    dropout, eager attention and a tiled MLP keep eager autograd's terms."""
    return (lay.compiled and (lay.trainable or (lay.adapters and not lay.adapter_dropout))
            and lay.attention != "eager" and not lay.tiled_mlp)


def _compiled_kept(s: Shape, lay: Layout) -> list[Term]:
    """What the partitioner keeps of a compiled layer's norms, linear inputs and MLP (attention aside)."""
    a, r, d, m = lay.compute, lay.residual, s.d, lay.mlp
    mlp = (Term("MLP gate, up (silu(gate) recomputed)", 2 * m * s.ffn, f"2 x {m} x ffn({s.ffn})") if s.gated
           else Term("MLP up", m * s.ffn, f"{m} x ffn({s.ffn})"))
    return [Term("RMSNorm inputs + rsqrt: the layer's input, the attention's o_proj output (upcasts, "
                 "normalised outputs and the residual sum recomputed)", (r + a) * d + 8,
                 f"({r} + {a}) x d({d}) + 2 x 4"),
            Term("q, k, v input (norm output, one copy)", a * d, f"{a} x d({d})"),
            Term("gate, up input (norm output, one copy)", a * d, f"{a} x d({d})"),
            Term("down input (MLP product)", m * s.ffn, f"{m} x ffn({s.ffn})"),
            mlp] + _compiled_adapters(s, lay)


def _compiled_adapters(s: Shape, lay: Layout) -> list[Term]:
    """What a compiled layer's LoRA adapters keep besides the base's terms: the o adapter's copy of the
    attention output and each adapter's rank-r output."""
    if not lay.adapters:
        return []
    a, n = lay.compute, 7 if s.gated else 6
    terms = [Term("LoRA A outputs", n * a * lay.lora_r, f"{n} x {a} x r({lay.lora_r})")]
    if a != 4:  # peft casts the input to the fp32 adapters: a copy (none where everything is fp32)
        terms.insert(0, Term("o adapter's input (its copy of the attention output)", a * s.q,
                             f"{a} x q({s.q})"))
    return terms


def layer_terms(s: Shape, lay: Layout, seq_len: int) -> list[Term]:
    """Bytes per token one decoder layer keeps for backward, tensor by tensor."""
    if compiled_modelled(lay):
        return _compiled_kept(s, lay) + _attention(s, lay, seq_len)
    eager_count = " (compiled, not modelled here: eager autograd's count)" if lay.compiled else ""
    return _eager_terms(s, lay, seq_len, eager_count)


def recomputed_terms(s: Shape, lay: Layout, seq_len: int) -> list[Term]:
    """Bytes per token a checkpointed layer holds once recomputed in backward: ``layer_terms``, except for a
    compiled layer with adapters, whose recompute and backward Inductor runs as one graph (not modelled:
    eager autograd's count)."""
    if lay.compiled and lay.adapters:
        note = " (compiled and recomputed, not modelled: eager autograd's count)"
        return _eager_terms(s, lay, seq_len, note)
    return layer_terms(s, lay, seq_len)


def _eager_terms(s: Shape, lay: Layout, seq_len: int, note: str) -> list[Term]:
    """``layer_terms`` as eager autograd keeps them (``note`` labels the first term)."""
    a, r, d, eager_count = lay.compute, lay.residual, s.d, note
    norm_h = f" + {r} x d (normalised, trainable weight)" if lay.trainable else ""
    terms = [Term("2 RMSNorms" + eager_count, 2 * (4 * d + 4 + (r * d if lay.trainable else 0)),
                  f"2 x (4 x d({d}) fp32 input + 4 rsqrt{norm_h})")]
    terms += _inputs(s, lay)
    terms += _attention(s, lay, seq_len)
    mlp = 3 if s.gated else 1
    if not lay.tiled_mlp:
        terms.append(Term("MLP gate, up, activation" if s.gated else "MLP up", mlp * lay.mlp * s.ffn,
                          f"{mlp} x {lay.mlp} x ffn({s.ffn})"))
    if lay.adapters:
        n = 4 if lay.tiled_mlp else 7 if s.gated else 6  # tiled: the MLP's adapters see one chunk at a time
        terms.append(Term("LoRA A outputs", n * a * lay.lora_r, f"{n} x {a} x r({lay.lora_r})"))
    return terms


def _attention(s: Shape, lay: Layout, seq_len: int) -> list[Term]:
    """What attention keeps: q, k, v, its output, a logsumexp (or eager's probabilities), a converted mask."""
    a, terms = lay.compute, []
    eager = lay.attention == "eager"
    expanded = eager or (lay.masked and lay.attention == "sdpa")  # repeat_kv: keys/values for every head
    kv = s.q if expanded else s.kv
    terms.append(Term("q, k, v for attention", a * (s.q + 2 * kv),
                      f"{a} x (q({s.q}) + 2 x {'q (heads repeated)' if expanded else 'kv'}({kv}))"))
    terms.append(Term("attention output", a * s.q, f"{a} x q({s.q})"))
    if eager:
        both = 4 + (a if a != 4 else 0)
        kinds = f"4 fp32 + {a}" if a != 4 else "4 fp32"
        terms.append(Term("eager probabilities (seq^2)", both * s.heads * seq_len,
                          f"({kinds}) x heads({s.heads}) x seq({seq_len})"))
    else:
        terms.append(Term("logsumexp", 4 * s.heads, f"4 x heads({s.heads})"))
    if lay.masked and lay.attention == "sdpa":
        terms.append(Term("mask SDPA converts per layer", a * seq_len, f"{a} x seq({seq_len})"))
    return terms


def non_layer_terms(s: Shape, lay: Layout, chunked: bool, rows: int = 1) -> list[Term]:
    """Bytes per token kept outside the decoder layers: the final norm and the rotary tables (one per
    position, shared by the ``rows`` of a batch without ``position_ids``)."""
    r, d = lay.residual, s.d
    keep_out = lay.trainable and not chunked  # the LM head's input (the chunked loss keeps a gradient)
    terms = [Term("final norm", 4 * d + 4 + (r * d if lay.trainable else 0) + (r * d if keep_out else 0),
                  f"4 x d({d}) fp32 input + 4" + (f" + {r} x d normalised" if lay.trainable else "")
                  + (f" + {r} x d LM-head input" if keep_out else "")),
             Term("rotary cos, sin", 2 * s.head_dim * r / rows,
                  f"2 x head_dim({s.head_dim}) x {r}" + (f" / rows({rows})" if rows > 1 else ""))]
    return terms  # the attention mask itself: no backward keeps it, it is gone once the decoder returns


def first_layer_saving(s: Shape, lay: Layout, recomputed: bool = False) -> Term:
    """Bytes per token the first layer keeps less than the others: with frozen embeddings its input needs
    no gradient, so its input norm keeps nothing (eager: its fp32 input and rsqrt; compiled: the layer's
    input and rsqrt). ``recomputed``: the layer is checkpointed (see ``recomputed_terms``)."""
    name = "first layer's input norm keeps nothing (frozen embeddings)"
    if lay.trainable:
        return Term(name, 0, "0")
    if compiled_modelled(lay) and not (recomputed and lay.adapters):
        return Term(name, lay.residual * s.d + 4, f"{lay.residual} x d({s.d}) + 4")
    return Term(name, 4 * s.d + 4, f"4 x d({s.d}) + 4")


def checkpointed_layer(s: Shape, lay: Layout, offload: bool) -> Term:
    """What a checkpointed layer keeps: its input (in host memory with offloading)."""
    if offload:
        return Term("checkpointed input (in host memory)", 0, "0 (offloaded)")
    return Term("checkpointed input", lay.residual * s.d, f"{lay.residual} x d({s.d})")


def backward_transient(s: Shape, lay: Layout, seq_len: int) -> Term:
    """Bytes per token a layer's backward holds on top of what it kept: the incoming gradient of the
    residual stream, and the MLP's gradients at their widest (the product's gradient and the two it
    splits into, less the product itself, which the down projection's backward frees), or the eager
    softmax's fp32 gradients in and out. A tiled MLP holds the incoming gradient and the input gradient
    it fills chunk by chunk (one chunk's tensors: ``tiled_mlp_backward``)."""
    a, width, r = lay.mlp, 2 if s.gated else 1, lay.residual
    if lay.tiled_mlp:
        mlp = Term("tiled MLP backward: incoming + input gradient", 2 * r * s.d, f"2 x {r} x d({s.d})")
    else:
        mlp = Term("MLP backward gradients", a * width * s.ffn + r * s.d,
                   f"{a} x {width} x ffn({s.ffn}) + {r} x d({s.d})")
    if lay.attention == "eager" and 8 * s.heads * seq_len > mlp.value:
        return Term("eager softmax backward", 8 * s.heads * seq_len, f"8 x heads({s.heads}) x seq({seq_len})")
    return mlp


def attention_backward(s: Shape, lay: Layout) -> Term:
    """Bytes per token a fused attention's backward holds on top of what the layer kept: the incoming
    gradient of the residual stream, the attention output's gradient, and the query, key and value
    gradients (at every head's width where the key/value heads were repeated)."""
    a, r = lay.compute, lay.residual
    kv = s.q if lay.attention == "eager" or (lay.masked and lay.attention == "sdpa") else s.kv
    return Term("attention backward: incoming, output, q, k, v gradients", a * (2 * s.q + 2 * kv) + r * s.d,
                f"{a} x (2 x q({s.q}) + 2 x kv({kv})) + {r} x d({s.d})")


def tiled_mlp_backward(s: Shape, lay: Layout, chunk: int, mlp_params: int, param_bytes: int) -> Term:
    """Bytes (for the whole step, not per token) a tiled MLP's backward holds besides its per-token
    gradients: one chunk's recomputed gate, up, activation and product, its gradients at their widest and
    its output; and the trained MLP weights' gradients summed in fp32 over the chunks, with one chunk's
    gradients in the weights' dtype (``mlp_params``: the MLP's trained parameters, one layer)."""
    c, m = chunk, lay.mlp
    weights = mlp_params * (4 + param_bytes)
    return Term("tiled MLP backward: one chunk + fp32 weight-gradient sums", 6 * m * s.ffn * c + m * s.d * c
                + weights, f"(6 x {m} x ffn({s.ffn}) + {m} x d({s.d})) x chunk({c}) + {mlp_params:,} "
                f"trained MLP parameters x (4 + {param_bytes}) B")


def per_token(terms: list[Term]) -> float:
    return sum(t.value for t in terms)
