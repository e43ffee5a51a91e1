"""Batch sizes that fit in memory (the scale issue's item 6): a batch that runs out of memory is run
again in halves, down to one sequence, with the same results; `auto` searches for the largest
evaluation batch that fits. Running out of memory is simulated on the CPU by raising torch's CUDA
out-of-memory error from a module whenever it runs on more than `k` rows."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from shearkit.errors import ShearkitError, out_of_memory

from conftest import VOCAB, make_tiny

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
CALIB = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(3))


class Limit:
    """Make `module` run out of memory (forward, or with `backward` its backward pass) on more than `k`
    rows (every call: k=0); `sizes` records the rows of every call. `error` raises that instead."""

    def __init__(self, module, k: int, *, backward: bool = False, error: Exception | None = None):
        self.k, self.sizes, self.error = k, [], error
        if backward:
            self.handle = module.register_full_backward_hook(lambda m, gi, go: self._check(go[0].shape[0]))
        else:
            self.handle = module.register_forward_pre_hook(
                lambda m, args, kwargs: self._check((args[0] if args else kwargs["hidden_states"]).shape[0]),
                with_kwargs=True)

    def _check(self, rows: int):
        self.sizes.append(rows)
        if rows > self.k:
            raise self.error if self.error is not None else torch.OutOfMemoryError(OOM)

    def remove(self):
        self.handle.remove()


def embed(model):
    return model.get_input_embeddings()


def _windows_file(tmp_path, lines=60):
    f = tmp_path / "t.txt"
    f.write_text("\n".join(["the quick brown fox jumps over the lazy dog", "pruning makes language models smaller"]
                           * (lines // 2)) + "\n")
    return str(f)


# -- evaluation ------------------------------------------------------------------------------------------

def test_auto_batch_size_starts_high_on_an_accelerator_and_is_one_on_the_cpu():
    from shearkit.batching import AUTO_START, resolve_batch_size

    assert resolve_batch_size("auto", 500, "cuda") == AUTO_START == 64
    assert resolve_batch_size("auto", 9, "cuda:1") == 9
    assert resolve_batch_size("auto", 500, "cpu") == 1  # CPU: as before
    assert resolve_batch_size(3, 500, "cuda") == 3
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        resolve_batch_size(0, 5, "cpu")


def test_perplexity_auto_halves_until_a_batch_fits_and_keeps_it(tiny_tokenizer, tmp_path, monkeypatch, caplog):
    """On an accelerator (simulated) `auto` starts at all the windows and halves until a batch fits;
    the windows scored in the batches it settles on give the very perplexity a fixed batch of that size
    gives, and batch 1's up to float order."""
    import importlib

    from shearkit import batching

    ppl_mod = importlib.import_module("shearkit.eval.perplexity")  # the module (the package exports the function)

    model, f = make_tiny("llama"), _windows_file(tmp_path)
    fixed2 = ppl_mod.perplexity(model, tiny_tokenizer, f, seqlen=16, batch_size=2, limit=20)
    one = ppl_mod.perplexity(model, tiny_tokenizer, f, seqlen=16, batch_size=1, limit=20)
    assert fixed2["windows"] == 20
    monkeypatch.setattr(ppl_mod, "resolve_batch_size", lambda b, rows, dev: batching.resolve_batch_size(b, rows, "cuda"))
    limit = Limit(embed(model), 2)
    with caplog.at_level(logging.INFO, logger="shearkit.batching"):
        got = ppl_mod.perplexity(model, tiny_tokenizer, f, seqlen=16, batch_size="auto", limit=20)
    limit.remove()
    tried = limit.sizes[:5]
    assert tried == [20, 10, 5, 3, 2]  # all the windows (at most 64), halved (rounding up) until a batch fits
    assert limit.sizes[5:] == [2] * 9  # kept: the other 18 windows in batches of 2
    assert (got["batch_size"], got["batch_size_requested"]) == (2, "auto")
    assert got["ppl"] == fixed2["ppl"] and got["nll"] == fixed2["nll"]  # the same batches: bit-identical
    assert got["ppl"] == pytest.approx(one["ppl"], rel=1e-6)
    assert "batch size auto chose 2" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "shearkit.batching"]  # auto: no warning


def test_a_fixed_batch_that_runs_out_of_memory_halves_with_a_warning(tiny_tokenizer, tmp_path, caplog):
    from shearkit.eval.perplexity import perplexity

    model, f = make_tiny("gpt2"), _windows_file(tmp_path)
    fixed2 = perplexity(model, tiny_tokenizer, f, seqlen=16, batch_size=2)
    limit = Limit(embed(model), 3)
    with caplog.at_level(logging.WARNING, logger="shearkit.batching"):
        got = perplexity(model, tiny_tokenizer, f, seqlen=16, batch_size=8)
    limit.remove()
    assert limit.sizes[:3] == [8, 4, 2] and max(limit.sizes[3:]) == 2
    assert got["batch_size"] == 2 and got["batch_size_requested"] == 8
    assert got["ppl"] == fixed2["ppl"]
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "shearkit.batching"]
    assert len(warn) == 2 and "out of memory with 8 sequences per forward pass; running it again with 4" in warn[0]


def test_out_of_memory_at_one_window_is_the_clear_error(tiny_tokenizer, tmp_path):
    from shearkit.eval.perplexity import perplexity

    model = make_tiny("llama")
    limit = Limit(embed(model), 0)
    with pytest.raises(torch.OutOfMemoryError) as e:
        perplexity(model, tiny_tokenizer, _windows_file(tmp_path), seqlen=16, batch_size=4)
    assert limit.sizes == [4, 2, 1]
    assert str(out_of_memory(e.value)).startswith("Out of memory on the GPU (CUDA out of memory")


def test_out_of_memory_at_one_window_through_the_command_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`shearkit eval --batch-size 4` end to end: the real evaluation backs off to one window, then ends
    in the one clear line that says what to lower (exit 2)."""
    from shearkit.cli import main

    real, sizes = torch.nn.Embedding.forward, []

    def forward(self, ids):
        if ids.dim() == 2:
            sizes.append(ids.shape[0])
            raise torch.OutOfMemoryError(OOM)
        return real(self, ids)

    monkeypatch.setattr(torch.nn.Embedding, "forward", forward)
    monkeypatch.setattr(sys, "argv", ["shearkit", "eval", str(tiny_model_dir), "--tasks", _windows_file(tmp_path),
                                      "--seqlen", "16", "--out", str(tmp_path / "run"), "--device", "cpu",
                                      "--batch-size", "4"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and sizes == [4, 2, 1]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Out of memory on the GPU (CUDA out of memory" in err


@pytest.mark.parametrize("error", [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("bad"),
                                   RuntimeError("CUDA error: device-side assert triggered")],
                         ids=["runtime", "value", "cuda-assert"])
def test_other_errors_are_never_taken_for_out_of_memory(error, tiny_tokenizer, tmp_path):
    from shearkit.calibration.blockwise import capture_inputs
    from shearkit.eval.perplexity import perplexity
    from shearkit.importance.stats import collect_stats

    model = make_tiny("llama")
    limit = Limit(embed(model), 1, error=error)
    with pytest.raises(type(error), match=str(error)):
        perplexity(model, tiny_tokenizer, _windows_file(tmp_path), seqlen=16, batch_size=4)
    with pytest.raises(type(error), match=str(error)):
        capture_inputs(model, CALIB, batch_size=4)
    with pytest.raises(type(error), match=str(error)):
        collect_stats(model, CALIB, batch_size=4)
    assert limit.sizes == [4, 4, 4]  # each failed once, at the size asked for: no retry
    limit.remove()


def test_eval_batch_size_auto_in_recipes_and_on_the_command_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import json

    from shearkit.cli import main
    from shearkit.recipe import EvalConfig, load_recipe

    assert EvalConfig().batch_size == "auto"  # the default: 1 on the CPU, the largest that fits on a GPU
    assert load_recipe(None, extra={"eval": {"batch_size": "Auto"}}).eval.batch_size == "auto"
    assert load_recipe(None, extra={"eval": {"batch_size": "3"}}).eval.batch_size == 3
    with pytest.raises(ShearkitError, match="--batch-size must be a whole number of windows or 'auto', got 'many'"):
        load_recipe(None, extra={"eval": {"batch_size": "many"}})
    monkeypatch.setattr(sys, "argv", ["shearkit", "eval", str(tiny_model_dir), "--tasks", _windows_file(tmp_path),
                                      "--seqlen", "16", "--limit", "3", "--json", "--out", str(tmp_path / "run"),
                                      "--device", "cpu", "--batch-size", "auto"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    rec = next(iter(json.loads(capsys.readouterr().out).values()))
    assert (rec["batch_size"], rec["batch_size_requested"]) == (1, "auto")  # the CPU: one window at a time


def test_auto_dtype_on_cuda_is_bfloat16_only_where_the_gpu_computes_it(monkeypatch):
    from shearkit.device import resolve_dtype

    native = {"v": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        native["v"] or including_emulation)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    native["v"] = False  # e.g. a T4 or V100: bfloat16 only emulated
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "cpu") == torch.float32


# -- calibration -------------------------------------------------------------------------------------------

def _close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_calibration_capture_and_block_forwards_back_off_within_each_batch():
    """Batches keep their windows (methods take a step per batch, checkpoints store per batch); only the
    calls inside a batch get smaller, and the inputs and every block's outputs are the same."""
    from shearkit.arch import get_adapter
    from shearkit.calibration.blockwise import capture_inputs, walk_blocks

    model = make_tiny("llama")
    ref = capture_inputs(model, CALIB, batch_size=4)
    ref_in = [h.clone() for h in ref.hidden]
    ref_out = walk_blocks(model, ref).hidden  # (walk_blocks replaces the inputs by the outputs)
    limit = Limit(embed(model), 1)
    got = capture_inputs(model, CALIB, batch_size=4)
    limit.remove()
    assert limit.sizes == [4, 2, 1, 1, 1, 1, 1, 1, 1, 1]  # the first batch backs off; the second starts at 1
    assert [h.shape[0] for h in got.hidden] == [4, 4]
    assert all(torch.equal(a, b) for a, b in zip(got.hidden, ref_in))  # the very same inputs
    assert got.backoff.size == 1  # the blocks start where the capture ended (the stem is lighter than a block)
    got = capture_inputs(model, CALIB, batch_size=4)
    limits = [Limit(layer, 2) for layer in get_adapter(model).layers]
    walk_blocks(model, got)
    for lim in limits:
        lim.remove()
    assert limits[0].sizes == [4, 2, 2, 2, 2] and limits[1].sizes == [2, 2, 2, 2]  # backed off once, for all
    assert [h.shape[0] for h in got.hidden] == [4, 4]
    assert all(_close(a, b) for a, b in zip(got.hidden, ref_out))


def test_capture_refuses_to_split_a_batch_whose_arguments_are_not_per_window():
    """A block argument that differs between the parts of a batch yet is not one row per window cannot
    be joined back into one batch: a clear error rather than wrong inputs."""
    from shearkit.arch import get_adapter
    from shearkit.calibration.blockwise import capture_inputs

    model = make_tiny("llama")
    first = get_adapter(model).layers[0]
    count = iter(range(100))
    handle = first.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "call": next(count)}), with_kwargs=True,
                                             prepend=True)
    limit = Limit(embed(model), 2)
    with pytest.raises(ShearkitError, match="A calibration batch of 4 windows ran out of memory, and it cannot be"):
        capture_inputs(model, CALIB, batch_size=4)
    limit.remove()
    handle.remove()


def test_block_scores_are_the_same_after_backing_off():
    """ShortGPT's block influence (blockwise) and perplexity drop (one evaluation per block, which share
    one batch size: the first backs off, the others start where it ended)."""
    from shearkit.importance.blocks import block_influence, perplexity_drop

    model = make_tiny("llama")
    ref_bi, ref_drop = block_influence(model, CALIB, batch_size=4), perplexity_drop(model, CALIB, batch_size=4)
    limit = Limit(embed(model), 1)
    bi, drop = block_influence(model, CALIB, batch_size=4), perplexity_drop(model, CALIB, batch_size=4)
    limit.remove()
    assert bi == pytest.approx(ref_bi, rel=1e-5, abs=1e-7) and drop == pytest.approx(ref_drop, rel=1e-5)
    ppl_sizes = limit.sizes[limit.sizes.index(4, 3):]  # after block influence's capture: 4, 2, 1, then 1s
    assert ppl_sizes[:3] == [4, 2, 1] and set(ppl_sizes[3:]) == {1}
    assert len(ppl_sizes) == 3 + 8 - 1 + 8 * 3  # the base pass (8 windows), then 3 passes of 8 at batch 1


@pytest.mark.parametrize("hessian", [False, True], ids=["wanda", "sparsegpt"])
def test_block_input_statistics_are_the_same_sums_after_backing_off(hessian):
    """Out of memory in the middle of a block (after the attention's inputs were counted) must not count
    them twice: the statistics start again, and equal the unsplit ones up to float order."""
    from shearkit.arch import get_adapter
    from shearkit.calibration.blockwise import capture_inputs
    from shearkit.calibration.stats import collect_input_stats
    from shearkit.sparsity.layers import block_linears

    model = make_tiny("llama")
    view = get_adapter(model).block_view(0)
    mods = {r.name: r.module for r in block_linears(view).values()}
    ref_inputs = capture_inputs(model, CALIB, batch_size=4)
    ref_out: list = []
    ref = collect_input_stats(view.module, mods, ref_inputs, hessian=hessian, outputs=ref_out)
    inputs = capture_inputs(model, CALIB, batch_size=4)
    limit = Limit(view.module.mlp.down_proj, 1)  # late in the block: q, k, v and o already counted
    out: list = []
    got = collect_input_stats(view.module, mods, inputs, hessian=hessian, outputs=out)
    limit.remove()
    assert inputs.backoff.size == 1 and inputs.backoff.backed_off
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].tokens == ref[name].tokens == 8 * 16
        assert _close(got[name].sq_norm, ref[name].sq_norm)
        if hessian:
            assert _close(got[name].hessian, ref[name].hessian)
    assert (got["model.layers.0.self_attn.k_proj"] is got["model.layers.0.self_attn.q_proj"]) == \
        (ref["model.layers.0.self_attn.k_proj"] is ref["model.layers.0.self_attn.q_proj"])
    assert all(_close(a, b) for a, b in zip(out, ref_out))


def test_wanda_prunes_the_same_after_backing_off():
    import shearkit
    from shearkit.arch import get_adapter

    ref_model, model = make_tiny("llama"), make_tiny("llama")
    shearkit.prune(ref_model, None, "wanda", 0.5, calib=CALIB, batch_size=4)
    limits = [Limit(layer, 1) for layer in get_adapter(model).layers]
    shearkit.prune(model, None, "wanda", 0.5, calib=CALIB, batch_size=4)
    # the first block's limit is met while capturing the inputs already; every block then starts at 1
    assert limits[0].sizes[:3] == [4, 2, 1] and all(set(lim.sizes) == {1} for lim in limits[1:])
    assert set(limits[0].sizes[3:]) == {1}
    for (n, a), b in zip(ref_model.named_parameters(), model.parameters()):
        assert torch.equal(a == 0, b == 0), n


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_gradient_statistics_are_the_same_after_backing_off(where):
    """LLM-Pruner's pass: out of memory in the backward pass leaves part of a batch's gradient behind, so
    the pass starts again with half the windows per call, each chunk's loss weighted by its share."""
    from shearkit.arch import get_adapter
    from shearkit.importance.stats import collect_stats

    model = make_tiny("gpt2")  # with biases
    ref = collect_stats(model, CALIB, grads=True, act_norms=True, batch_size=4)
    assert ref.grads and ref.bias_grads and ref.act_sq
    limit = Limit(get_adapter(model).layers[0], 2, backward=where == "backward")
    got = collect_stats(model, CALIB, grads=True, act_norms=True, batch_size=4)
    limit.remove()
    assert 4 in limit.sizes and max(limit.sizes[limit.sizes.index(4) + 1:]) == 2
    assert got.n_tokens == ref.n_tokens and got.loss == pytest.approx(ref.loss, rel=1e-6)
    for d_ref, d_got in ((ref.grads, got.grads), (ref.bias_grads, got.bias_grads), (ref.act_sq, got.act_sq)):
        assert d_ref.keys() == d_got.keys()
        assert all(d_got[k].device.type == "cpu" and _close(d_got[k], d_ref[k]) for k in d_ref)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_statistics_back_off_from_their_checkpoint(tmp_path):
    """Out of memory at the third batch, after two were checkpointed: the pass goes on from its own
    checkpoint with smaller calls, to the same statistics."""
    from shearkit.importance.stats import collect_stats

    tokens = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(5))
    model = make_tiny("llama")
    ref = collect_stats(model, tokens, grads=True, act_norms=True, batch_size=2)
    calls = {"n": 0}

    def pre(_m, args):
        calls["n"] += 1
        if calls["n"] == 3 and args[0].shape[0] > 1:
            raise torch.OutOfMemoryError(OOM)

    h = embed(model).register_forward_pre_hook(pre)
    got = collect_stats(model, tokens, grads=True, act_norms=True, batch_size=2, checkpoint=tmp_path, save_every=1)
    h.remove()
    assert calls["n"] == 2 + 1 + 2 * 2  # two batches, the failed third, then batches 3 and 4 in halves
    assert got.loss == pytest.approx(ref.loss, rel=1e-6)
    assert all(_close(got.grads[k], ref.grads[k]) for k in ref.grads)
    assert all(_close(got.act_sq[k], ref.act_sq[k]) for k in ref.act_sq)


def test_lora_importance_pass_backs_off():
    from shearkit.arch import get_adapter
    from shearkit.importance.passes import lora_pass

    ref = lora_pass(make_tiny("llama"), CALIB, batch_size=4)
    model = make_tiny("llama")
    limit = Limit(get_adapter(model).layers[1], 1, backward=True)
    got = lora_pass(model, CALIB, batch_size=4)
    limit.remove()
    assert limit.sizes[0] == 4 and max(limit.sizes[1:]) <= 2
    assert ref.keys() == got.keys() and all(_close(got[k], ref[k]) for k in ref)


# -- training ----------------------------------------------------------------------------------------------

def _train(tiny_tokenizer, text_file, *, k=None, backward=False, out=None, resume=False, **cfg):
    """LoRA recovery of a tiny llama; `k`: every forward pass (with `backward`: the backward pass through
    the second block, after the third block's gradients were accumulated) on more than k sequences runs
    out of memory. Returns (history, the rows of every such pass, the trained adapters)."""
    from peft import get_peft_model

    from shearkit.arch import get_adapter
    from shearkit.recovery import RecoverConfig
    from shearkit.recovery.data import build_train_data
    from shearkit.recovery.lora import lora_config
    from shearkit.recovery.loop import Trainer

    base = make_tiny("llama")
    config = RecoverConfig(**{"data": str(text_file), "steps": 4, "batch_size": 4, "grad_accum": 1, "seqlen": 16,
                              "dropout": 0.0, "warmup": 0, "lr": 1e-3, "merge": False, **cfg})
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(base, config.rank, config.alpha, config.dropout))
    train = build_train_data(tiny_tokenizer, config.data, mode=config.mode, seqlen=config.seqlen)
    where = get_adapter(base).layers[1] if backward else embed(base)
    limit = Limit(where, 10**6 if k is None else k, backward=backward)
    trainer = Trainer(model, tiny_tokenizer, train, config, root=out, desc="recover")
    history = trainer.fit(resume)
    limit.remove()
    return history, limit.sizes, {n: p.detach().clone() for n, p in trainer.named_params.items()}


@pytest.mark.parametrize("backward,grad_accum", [(False, 1), (True, 2)], ids=["forward", "backward-accumulating"])
def test_training_halves_the_micro_batch_and_keeps_the_losses(backward, grad_accum, tiny_tokenizer, text_file,
                                                              caplog):
    """batch_size 4 that runs out of memory above 2 sequences trains as 4 sequences per micro-batch in
    calls of 2: exactly batch_size 2 x twice the grad_accum, and batch_size 4 up to float order. Out of
    memory in a backward pass leaves part of a gradient behind (and accelerate's count of micro-batches
    one ahead): the step starts again without either."""
    ref, ref_sizes, ref_w = _train(tiny_tokenizer, text_file, grad_accum=grad_accum)
    with caplog.at_level(logging.WARNING, logger="shearkit.batching"):
        got, sizes, w = _train(tiny_tokenizer, text_file, k=2, backward=backward, grad_accum=grad_accum)
    accum, _, accum_w = _train(tiny_tokenizer, text_file, batch_size=2, grad_accum=2 * grad_accum)
    assert set(ref_sizes) == {4} and sizes[:2] == [4, 2] and set(sizes[2:]) == {2}
    assert len(sizes) == 1 + 2 * grad_accum * 4  # one failed attempt, then 2 calls per micro-batch
    # exactly what halving batch_size and doubling grad_accum gives (the same calls, the same sums) ...
    assert got["losses"] == accum["losses"] and all(torch.equal(w[n], accum_w[n]) for n in ref_w)
    # ... and batch_size 4's losses and weights up to float order: Adam divides by the root of the squared
    # gradient, so a gradient near zero differing in its last bits can move a weight by up to ~lr (1e-3) a
    # step; seen up to 2e-5 after 4 steps on some CPUs, so a tenth of one step's lr is the bound
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert all(torch.allclose(w[n], ref_w[n], rtol=0, atol=1e-4) for n in ref_w)
    assert (got["micro_batch_rows"], ref["micro_batch_rows"]) == (2, 4)
    assert got["budget"] == ref["budget"]  # still 4 x grad_accum sequences per step
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "shearkit.batching"]
    assert len(warn) == 1 and warn[0].startswith("recover: out of memory with 4 sequences per forward pass; "
                                                 "running it again with 2")


def test_a_backed_off_training_resumes_from_its_checkpoint(tiny_tokenizer, text_file, tmp_path):
    """The checkpoints keep the data position per optimizer step (the sampler and batch_size x grad_accum
    are untouched) and the smaller micro-batch: a resumed run starts with it and ends as the whole run."""
    whole, _, whole_w = _train(tiny_tokenizer, text_file, k=2, out=tmp_path / "a", save_every=2)
    _train(tiny_tokenizer, text_file, k=2, out=tmp_path / "b", save_every=2, steps=4)
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoint-4")  # as if killed after step 2's checkpoint
    resumed, sizes, w = _train(tiny_tokenizer, text_file, k=2, out=tmp_path / "b", resume=True, save_every=2)
    assert resumed["resumed_from"] == 2
    assert set(sizes) == {2}  # started at the smaller micro-batch: no new out-of-memory attempt
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-6)
    assert all(torch.allclose(w[n], whole_w[n], rtol=1e-6, atol=1e-7) for n in whole_w)


def test_training_out_of_memory_at_one_sequence_is_the_clear_error(tiny_tokenizer, text_file):
    with pytest.raises(torch.OutOfMemoryError) as e:
        _train(tiny_tokenizer, text_file, k=0)
    assert "Out of memory on the GPU" in str(out_of_memory(e.value))
