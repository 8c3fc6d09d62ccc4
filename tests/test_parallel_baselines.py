"""The baselines notebook 02 compares FSDP2 with, set up as their docs advise (issue 14): DDP with its
gradients as views of the all-reduce buckets, ZeRO-3 with buckets and persistence tuned for the model,
and every strategy's loss computed inside the module the engine wraps."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from recipes_lib.core import models, train
from recipes_lib.measure import predict
from recipes_lib.parallel import ddp, launcher, run, strategies, zero

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")

# Two DDP models on the same gloo process group and the same batches: the bucket view (ours) and
# DDP's default. After the last backward and after the optimizer step, each reports the bytes DDP
# holds for gradients: its buckets, plus the .grad storages that are not those buckets. The buckets'
# size is DDP's own logging record; gradients live in the buckets when fewer storages than
# parameters hold them (only the buckets make gradients share a storage) and those storages add up
# to the buckets' bytes.
DDP_WORKER = """
    import sys
    import torch
    from recipes_lib.core import models, train
    from recipes_lib.measure import memory
    from recipes_lib.parallel import context, ddp, step

    def held(model):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        sizes = str(model._get_ddp_logging_data()["bucket_sizes"]).split(",")
        buckets = sum(int(size) for size in sizes)
        storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}
        in_buckets = (len(grads) == len(list(model.parameters())) and len(storages) < len(grads)
                      and sum(storages.values()) == buckets)
        return {"held": buckets + (0 if in_buckets else memory.tensor_bytes(grads)), "in_buckets": in_buckets}

    ctx = context.setup()
    out = {}
    for name, overrides in {"view": {}, "default": {"gradient_as_bucket_view": False}}.items():
        torch.manual_seed(0)
        lm = models.load_model(sys.argv[1], dtype=torch.float32)
        model = ddp.wrap_ddp(train.LossModel(lm), ctx, micro_batches_per_step=2, **overrides)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(ctx.rank)
        losses, after_backward, after_step = [], [], []
        for _ in range(3):
            micro = [{"input_ids": torch.randint(0, 64, (2, 16), generator=generator),
                      "labels": torch.randint(0, 64, (2, 16), generator=generator)} for _ in range(2)]
            result = step.train_step(model, optimizer, micro, ctx.device,
                                     after_backward=lambda m=model: after_backward.append(held(m)))
            losses.append(result.loss)
            after_step.append(held(model))
        out[name] = {"losses": losses, "after_backward": after_backward, "after_step": after_step,
                     "param_bytes": memory.param_bytes(model), "settings": ddp.settings(model),
                     "n_params": sum(p.numel() for p in model.parameters())}
    context.report_result(ctx, **out)
    context.cleanup()
"""


def test_ddp_bucket_view_holds_the_gradients_once(tiny_model_dir, tmp_path):
    """On 2 gloo processes with 2 micro-batches per step (``no_sync`` before the last): DDP's default
    holds the gradients twice (.grad and the buckets), the bucket view once, in every step, and the
    views survive the optimizer step (zeroed in place), so the next step accumulates into them."""
    script = tmp_path / "ddp_worker.py"
    script.write_text(textwrap.dedent(DDP_WORKER))
    results = launcher.launch(script, 2, [tiny_model_dir], timeout_s=120, echo=False,
                              env={"PYTHONPATH": str(REPO_ROOT)})
    for rank in results:
        view, default = rank["view"], rank["default"]
        assert view["settings"] == {"gradient_as_bucket_view": True, "static_graph": False}
        assert default["settings"]["gradient_as_bucket_view"] is False
        torch.testing.assert_close(view["losses"], default["losses"], rtol=1e-6, atol=0)
        grads_once = view["param_bytes"]  # fp32 gradients, one per fp32 weight
        assert [r["held"] for r in default["after_backward"]] == [2 * grads_once] * 3
        assert [r["held"] for r in view["after_backward"]] == [grads_once] * 3
        assert all(r["in_buckets"] for r in view["after_backward"] + view["after_step"])
        assert not any(r["in_buckets"] for r in default["after_backward"])
        # what notebook 02 predicts for DDP's gradients before anything runs
        predicted = predict.strategy_state_bytes(view["n_params"], "ddp", 2)["gradients"]
        assert predicted == grads_once


def test_ddp_static_graph_only_without_no_sync():
    """static_graph is valid for steps of one micro-batch; with no_sync accumulation it breaks DDP."""
    assert ddp.ddp_kwargs(1) == {"gradient_as_bucket_view": True, "static_graph": True}
    accumulating = {"gradient_as_bucket_view": True, "static_graph": False}
    assert ddp.ddp_kwargs(4) == ddp.ddp_kwargs(None) == accumulating
    assert ddp.settings(torch.nn.Linear(2, 2)) is None


def test_ddp_with_static_graph_matches_one_process(tiny_model_dir, tmp_path):
    """One micro-batch per rank per step: DDP runs with static_graph and trains as one process does; the
    result records the options it ran with."""
    args = ["--model", tiny_model_dir, "--steps", "3", "--global-batch", "8", "--seq-len", "32"]
    reference = run.main(run.parse_args(args + ["--strategy", "single", "--micro-batch", "2"]))
    results = launcher.launch(Path(REPO_ROOT / "scripts" / "train_distributed.py"), 2,
                              args + ["--strategy", "ddp", "--micro-batch", "4"], timeout_s=90, echo=False)
    for result in results:
        assert result["engine_config"] == {"gradient_as_bucket_view": True, "static_graph": True}
        torch.testing.assert_close(result["losses"], reference["losses"], rtol=1e-5, atol=0)
        torch.testing.assert_close(result["grad_norms"], reference["grad_norms"], rtol=1e-5, atol=0)
    assert reference["engine_config"] is None


def _persisted(model: torch.nn.Module, zero_config: dict) -> set[str]:
    """The parameters DeepSpeed ZeRO-3 keeps gathered under ``zero_config``: its rule
    (``DeepSpeedZeRoOffload.mark_persistent_parameters``), in ``named_parameters`` order."""
    param_threshold = zero_config["stage3_param_persistence_threshold"]
    model_threshold = zero_config["stage3_model_persistence_threshold"]
    kept, total = set(), 0
    for name, p in model.named_parameters():
        if p.numel() + total > model_threshold:
            continue
        if p.numel() <= param_threshold:
            kept.add(name)
            total += p.numel()
    return kept


def _shapes(name: str):
    """``LossModel`` over a model of the named shape on the meta device (shapes, no memory)."""
    config = AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        return train.LossModel(AutoModelForCausalLM.from_config(config)), config


@pytest.mark.parametrize("shape", ["data/configs/llama-3.2-1b.json", "data/tiny-llama", "untied"])
def test_zero3_config_is_tuned_for_the_model(shape, tiny_model_dir):
    """Notebook 02's GPU and CPU models (tied LM head), and the tests' tiny model (untied)."""
    model, config = _shapes(tiny_model_dir if shape == "untied" else str(REPO_ROOT / shape))
    built = zero.deepspeed_config(3, micro_batch=2, accum_steps=2, world_size=2, max_grad_norm=1.0, bf16=True)
    tuned = zero.tune(built, model)["zero_optimization"]
    assert tuned["stage"] == 3 and tuned["overlap_comm"] is True and tuned["contiguous_gradients"] is True
    embedding = model.lm.get_input_embeddings().weight
    tied = model.lm.get_output_embeddings().weight is embedding
    assert tied == config.tie_word_embeddings == (shape != "untied")
    assert embedding.numel() == config.vocab_size * config.hidden_size
    assert tuned["stage3_param_persistence_threshold"] >= embedding.numel()
    kept = _persisted(model, tuned)
    norms = {n for n, p in model.named_parameters() if p.dim() == 1}
    # the embedding (= the tied LM head) and the norms stay gathered; every decoder-layer matrix, and
    # an untied LM head, is partitioned
    assert kept == {"lm.model.embed_tokens.weight"} | norms
    layer_numel = sum(p.numel() for p in models.decoder_layers(model)[0].parameters())
    assert tuned["stage3_prefetch_bucket_size"] == 2 * layer_numel  # the next layer while one computes
    assert tuned["reduce_bucket_size"] == layer_numel
    zero.check_deepspeed_config(built, 2, 2, 2)
    json.dumps(built)  # recorded in the run's results


def test_zero_tuning_keeps_what_a_config_sets_and_leaves_zero2_alone(tiny_model_dir):
    model, _ = _shapes(tiny_model_dir)
    given = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 123,
                                   "stage3_param_persistence_threshold": "auto"}}
    tuned = zero.tune(given, model)["zero_optimization"]
    assert tuned["stage3_prefetch_bucket_size"] == 123
    assert tuned["stage3_param_persistence_threshold"] == zero.zero3_tuning(model)[
        "stage3_param_persistence_threshold"]
    zero2 = zero.deepspeed_config(2, 2, 2, 2, 1.0, True)
    before = json.dumps(zero2, sort_keys=True)
    assert json.dumps(zero.tune(zero2, model), sort_keys=True) == before
    assert zero2["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert zero2["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize("strategy", strategies.STRATEGIES)
def test_every_strategy_computes_the_loss_in_the_wrapped_forward(strategy, tiny_model_dir):
    """The model each strategy hands its engine is a ``LossModel``: the loss, LM head included, runs in
    the forward that DDP, FSDP2 or DeepSpeed wraps (none is charged for a gather outside it)."""
    args = run.parse_args(["--model", tiny_model_dir, "--strategy", strategy, "--lora-r", "4"])
    model = strategies.load(args, CPU)
    assert isinstance(model, train.LossModel)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 64, (1, 8)), "labels": torch.randint(0, 64, (1, 8))}
    loss = model(**batch)
    assert loss.dim() == 0 and loss.requires_grad
