"""Every user-facing error of the methods, sparsity, analysis, surgery, plan and extension code makes
happen through the path a user takes: the command line (`shearkit prune / extend / analyze / plan
show`), the Python API (`shearkit.prune`, `apply_plan`, `extend`, `analyze`, `Plan.load`), or, for
checks that guard a building block, that block's own API (a method run in a `MethodContext`, the
block surgery functions)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

import shearkit as sk
from shearkit.errors import ShearkitError

from conftest import VOCAB, make_tiny

CALIB = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def _cli(monkeypatch, capsys, *args) -> str:
    """Run `shearkit ARGS` in process; it must fail with exit code 2 and one error line (no traceback)."""
    from shearkit.cli import main

    monkeypatch.setattr(sys, "argv", ["shearkit", *args])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and "error:" in err, err
    return " ".join(err.split())  # the console may wrap a long line


def _ctx(**kw):
    from shearkit.methods import MethodContext

    return MethodContext(None, **kw)


def _impl(method: str, **options):
    from shearkit.methods import get_method, method_config

    return get_method(method)(method_config({"method": method, **options}))


# -- a method's options, refused by the command line before any model is loaded -------------------

@pytest.mark.parametrize("method,sets,says", [
    ("besa", ["prune.granularity=column"], "prune.granularity must be 'row' or 'layer', got 'column'"),
    ("besa", ["prune.epochs=0"], "BESA needs prune.ratio > 0 and prune.epochs >= 1, got ratio 0.5 and epochs 0"),
    ("shortgpt", ["prune.ppl_samples=0"], "prune.ppl_samples and prune.batch_size must be >= 1, got 0 and 1"),
    ("wanda", ["prune.batch_size=0"], "prune.batch_size must be >= 1, got 0"),
    ("wanda", ["prune.save_every=-1"], "prune.save_every must be >= 0 (0: no checkpoints), got -1"),
    ("flexigpt", ["prune.rank=0"], "prune.rank must be a whole number >= 1 (or unset for hidden / 16), got 0"),
    ("flexigpt", ["prune.norm_init=0"], "prune.norm_init must be positive, got 0.0"),
    ("llm-pruner", ["prune.loss_chunk=-1"], "prune.loss_chunk must be 0 (off) or a number of tokens, got -1"),
    ("llm-pruner", ["prune.max_calib=0"], "prune.max_calib and prune.batch_size must be >= 1, got 0 and 1"),
    ("llm-pruner", ["prune.save_every=-2"], "prune.save_every must be >= 0 (0: no checkpoints), got -2"),
    ("lorashear", ["prune.analysis_save_every=-1"], "prune.analysis_save_every must be >= 0 (0: no checkpoints)"),
    ("lorashear", ["prune.trial_ratio=1"], "prune.trial_ratio must be strictly between 0 and 1, got 1.0"),
    ("lorashear", ["prune.warmup=1"], "prune.warmup must be a fraction of train.steps in [0, 1), got 1.0"),
    ("lorashear", ["prune.analysis_windows=0"],
     "prune.analysis_windows must be >= 1 and prune.analysis_seqlen >= 2, got 0 and 512"),
    ("lorashear", ["prune.train.seqlen=128"],
     "prune.train.seqlen (128) and prune.recovery.seqlen (256) must match"),
    ("structured-magnitude", ["prune.attn_unit=heads"], "prune.attn_unit must be one of"),
    ("llm-pruner", ["prune.dense_last=-1"], "prune.dense_last must be >= 0, got -1"),
    ("structured-magnitude", ["prune.norm=3"], "prune.norm must be 1 or 2, got 3"),
], ids=["besa-granularity", "besa-epochs", "block-ppl-samples", "sparsity-batch-size", "sparsity-save-every",
        "flexigpt-rank", "flexigpt-norm-init", "llm-pruner-loss-chunk", "llm-pruner-max-calib",
        "llm-pruner-save-every", "lorashear-analysis-save-every", "lorashear-trial-ratio", "lorashear-warmup",
        "lorashear-analysis-windows", "lorashear-seqlens", "attn-unit", "dense-last", "magnitude-norm"])
def test_prune_options_refused_on_the_command_line(method, sets, says, tmp_path, monkeypatch, capsys):
    args = ["prune", str(tmp_path / "no-model"), "--method", method, "--out", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    err = _cli(monkeypatch, capsys, *args)
    assert says in err, err
    assert not (tmp_path / "run").exists()


def test_round_to_flag_refused(tmp_path, monkeypatch, capsys):
    err = _cli(monkeypatch, capsys, "prune", str(tmp_path / "no-model"), "--method", "llm-pruner", "--round-to", "0",
               "--out", str(tmp_path / "run"))
    assert "prune.round_to must be >= 1, got 0" in err


def test_besa_refuses_a_zero_ratio_in_python():
    with pytest.raises(ShearkitError, match=r"BESA needs prune.ratio > 0"):
        sk.prune(make_tiny("llama"), None, "besa", 0.0, calib=CALIB)


# -- an allocation file --------------------------------------------------------------------------

def _alloc(tmp_path, **lists) -> str:
    p = tmp_path / "alloc.json"
    p.write_text(json.dumps({"layer_ratios": [1.0, 1.0, 1.0], **lists}))
    return str(p)


def test_allocation_file_with_bad_kind_ratios_refused_on_the_command_line(tmp_path, monkeypatch, capsys):
    path = _alloc(tmp_path, attn_ratios=[1.0, -1.0, 1.0], mlp_ratios=[1.0, 1.0, 1.0])
    err = _cli(monkeypatch, capsys, "prune", str(tmp_path / "no-model"), "--method", "structured-magnitude",
               "--allocation", path, "--out", str(tmp_path / "run"))
    assert '"attn_ratios" must be a list of numbers >= 0, one per decoder layer' in err


def test_allocation_file_with_kind_ratios_for_another_depth(tmp_path):
    path = _alloc(tmp_path, attn_ratios=[1.0, 1.0], mlp_ratios=[1.0, 1.0])
    with pytest.raises(ShearkitError, match=r"gives 2 attn_ratios, but the model has 3 decoder layers; give one"):
        sk.prune(make_tiny("llama"), None, "structured-magnitude", 0.2, allocation=path)


# -- running a method without what it needs -------------------------------------------------------

@pytest.mark.parametrize("method,says", [
    ("shortgpt", "shortgpt needs calibration tokens to score its blocks"),
    ("wanda", "Method 'wanda' needs calibration tokens"),
    ("llm-pruner", r"llm-pruner needs calibration tokens \(gradients of the LM loss\)"),
])
def test_a_method_run_without_calibration_tokens(method, says):
    with pytest.raises(ShearkitError, match=says):
        _impl(method).run(make_tiny("llama"), _ctx())


def test_block_scores_of_another_model_do_not_plan_this_one():
    impl = _impl("shortgpt", blocks=1)
    scores = impl.scores(make_tiny("llama"), _ctx(calib=CALIB))  # 3 blocks
    assert len(scores) == 3
    with pytest.raises(ShearkitError, match=r"3 block scores for a model with 2 blocks"):
        impl.plan_blocks(make_tiny("llama_tied"), scores)


@pytest.mark.parametrize("method,says", [("loraprune", "loraprune scores its groups while it trains; call run"),
                                          ("lorashear", "lorashear selects its groups while it trains; call run")])
def test_methods_that_train_score_only_in_run(method, says):
    with pytest.raises(ShearkitError, match=says):
        _impl(method).score(make_tiny("llama"), _ctx(), [0, 1])


def test_loraprune_with_every_layer_dense():
    with pytest.raises(ShearkitError, match=r"Every layer is kept dense \(3\); lower prune.dense_first"):
        sk.prune(make_tiny("llama"), None, "loraprune", 0.2, dense_first=2, dense_last=1)


def test_lorashear_with_nothing_to_prune(tiny_tokenizer, text_file):
    """A zero ratio with the analysis off gives no node group a target: refused before LHSPG trains."""
    with pytest.raises(ShearkitError, match="Nothing is left to prune: raise prune.ratio"):
        sk.prune(make_tiny("llama"), tiny_tokenizer, "lorashear", 0.0, gamma=0.0, periods=1, warmup=0.0,
                 train={"steps": 2, "seqlen": 16, "batch_size": 1},
                 recovery={"steps": 2, "seqlen": 16, "batch_size": 1},
                 dynamic={"phases": [[str(text_file)]], "round_steps": 1, "heldout_windows": 2,
                          "heldout_seqlen": 16})


def test_a_structured_method_with_an_unknown_dense_default():
    """A method written on the structured base names its default dense layers by rule; a rule the base
    does not know is refused when the method runs."""
    from shearkit.methods.structured_magnitude import StructuredMagnitude

    class Quarter(StructuredMagnitude):
        dense_default = "quarter"

    impl = Quarter(_impl("structured-magnitude", dense_first=None).config)
    with pytest.raises(ShearkitError, match="dense_default must be one of none, llm-pruner, got 'quarter'"):
        impl.run(make_tiny("llama"), _ctx())


def test_prune_with_a_config_and_options():
    from shearkit.methods import method_config

    cfg = method_config({"method": "magnitude", "ratio": 0.5})
    with pytest.raises(ShearkitError, match="Pass either a config object or a method name with options, not both"):
        sk.prune(make_tiny("llama"), None, cfg, 0.3)
    with pytest.raises(ShearkitError, match="not both"):
        sk.prune(make_tiny("llama"), None, cfg, nm="2:4")


# -- SparseGPT -------------------------------------------------------------------------------------

def test_sparsegpt_hessian_too_weakly_dampened():
    """Two windows of 8 tokens give a rank-16 Hessian over 64 inputs: with almost no dampening its
    Cholesky factorisation fails, and the message says to raise damp or add samples."""
    with pytest.raises(ShearkitError, match="not positive definite even after dampening; raise the SparseGPT 'damp'"):
        sk.prune(make_tiny("llama"), None, "sparsegpt", 0.5, calib=CALIB, damp=1e-12)


def test_sparsegpt_blocksize_not_a_multiple_of_m():
    with pytest.raises(ShearkitError, match=r"SparseGPT blocksize 6 must be a multiple of M=4 .*prune.blocksize"):
        sk.prune(make_tiny("llama"), None, "sparsegpt", nm="2:4", blocksize=6, calib=CALIB)


# -- knowledge-distribution analysis ---------------------------------------------------------------

@pytest.mark.parametrize("args,says", [
    (["--ratio", "1.0"], "ratio must be strictly between 0 and 1, got 1.0"),
    (["--ratio", "0.2", "--trial-ratio", "0"], "trial ratio must be strictly between 0 and 1, got 0.0"),
    (["--ratio", "0.2", "--calib-samples", "0"], "windows and calib samples must be >= 1, seqlen >= 2 and round_to"),
    (["--ratio", "0.2", "--round-to", "0"], "round_to 0"),
], ids=["ratio", "trial-ratio", "calib-samples", "round-to"])
def test_analyze_options_refused(args, says, tiny_model_dir, tmp_path, monkeypatch, capsys):
    err = _cli(monkeypatch, capsys, "analyze", str(tiny_model_dir), *args, "--tokens", "64", "--seqlen", "16",
               "--out", str(tmp_path / "sens.json"))
    assert says in err, err
    assert not (tmp_path / "sens.json").exists()


def test_analyze_taylor_with_heldout_windows_but_no_calibration():
    from shearkit.analysis import analyze

    held = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ShearkitError, match="taylor proxy needs calibration windows .*pass calib_windows"):
        analyze(make_tiny("llama"), None, 0.2, proxy="taylor", heldout=held, progress=False)


# -- extending a model -----------------------------------------------------------------------------

@pytest.mark.parametrize("args,says", [
    (["--add-blocks", "0"], "extend.add_blocks must be a whole number >= 1, got 0"),
    (["--add-blocks", "2", "--start", "-1"], "extend.start must be a block index >= 0, got -1"),
    (["--add-blocks", "2", "--end", "-3"], "extend.end must be a block index >= 0, got -3"),
    (["--add-blocks", "2", "--rank", "0"], "extend.rank must be a whole number >= 1 (or unset for hidden / 16), got 0"),
    (["--add-blocks", "2", "--set", "extend.norm_init=-0.5"], "extend.norm_init must be >= 0, got -0.5"),
], ids=["add-blocks", "start", "end", "rank", "norm-init"])
def test_extend_options_refused_on_the_command_line(args, says, tmp_path, monkeypatch, capsys):
    err = _cli(monkeypatch, capsys, "extend", str(tmp_path / "no-model"), *args, "--out", str(tmp_path / "run"))
    assert says in err, err
    assert not (tmp_path / "run").exists()


def test_extend_api_misuse():
    from shearkit.extension import ExtendConfig

    with pytest.raises(ShearkitError, match=r"Give a config or options \(rank\), not both"):
        sk.extend(make_tiny("llama"), None, ExtendConfig(add_blocks=3, training=False), rank=4)
    with pytest.raises(ShearkitError, match="resume=True needs run_dir, the folder that holds the training's"):
        sk.extend(make_tiny("llama"), None, add_blocks=3, resume=True)


# -- block surgery and shared blocks (the surgery API) --------------------------------------------

def test_rebuild_blocks_refuses_bad_layouts():
    from shearkit.surgery import rebuild_blocks

    model = make_tiny("llama")
    with pytest.raises(ShearkitError, match="A model needs at least one decoder block"):
        rebuild_blocks(model, [])
    with pytest.raises(ShearkitError, match=r"Block sources \[0, 5\] name blocks outside 0..2"):
        rebuild_blocks(model, [0, 5])
    with pytest.raises(ShearkitError, match="1 blocks given for 2 positions"):
        rebuild_blocks(model, [0, 1], [model.model.layers[0]])
    assert len(model.model.layers) == 3  # nothing changed


def test_extend_blocks_refuses_bad_counts_and_norms():
    from shearkit.surgery.extend import extend_blocks

    with pytest.raises(ShearkitError, match="The number of added blocks must be a whole number >= 1, got 0"):
        extend_blocks(make_tiny("llama"), 0, rank=4)
    with pytest.raises(ShearkitError, match=r"The output norms' initial scale must be >= 0, got -1.0"):
        extend_blocks(make_tiny("llama"), 1, "block", 0, 0, rank=4, norm_init=-1.0)


@pytest.mark.parametrize("i,j,rank,init,says", [
    (1, 1, 4, "svd", r"A block shares another block's weights: got block 1 and base 1 \(blocks 0..2\)"),
    (3, 0, 4, "svd", "got block 3 and base 0"),
    (1, 0, 4, "zeros", "The adapter init must be one of svd, lora, got 'zeros'"),
    (1, 0, 100, "svd", r"Adapter rank 100 is out of range: .* choose a rank from 1 to"),
    (1, 0, 0, "lora", "Adapter rank 0 is out of range"),
], ids=["same-block", "out-of-range", "init", "rank-high", "rank-zero"])
def test_share_block_refuses(i, j, rank, init, says):
    from shearkit.surgery.shared_block import share_block

    with pytest.raises(ShearkitError, match=says):
        share_block(make_tiny("llama"), i, j, rank, init=init)


def test_training_shared_parts_of_a_model_without_shared_blocks():
    from shearkit.surgery.shared_block import train_only_shared_parts

    with pytest.raises(ShearkitError, match="The model has no shared blocks to train; give it some first"):
        with train_only_shared_parts(make_tiny("llama")):
            pass


def test_saving_a_hand_made_sharing_shearkit_cannot_record(tmp_path, tiny_tokenizer):
    """Sharing built by hand with `SharedLinear` is saved only when it is what `share_block` builds:
    the same projection of one other block."""
    from shearkit.io.remote_code import SharedLinear

    crossed = make_tiny("llama")
    layers = crossed.model.layers
    layers[1].self_attn.q_proj = SharedLinear(layers[0].self_attn.o_proj, 4)  # another projection
    with pytest.raises(ShearkitError, match="shares a layer that is not the same projection of another block"):
        sk.save(crossed, tiny_tokenizer, tmp_path / "a")
    two = make_tiny("llama")
    layers = two.model.layers
    layers[1].self_attn.q_proj = SharedLinear(layers[0].self_attn.q_proj, 4)
    layers[1].self_attn.k_proj = SharedLinear(layers[2].self_attn.k_proj, 4)  # a second base
    with pytest.raises(ShearkitError, match=r"Block 1 shares layers of two blocks \(0 and 2\); a shared block has one"):
        sk.save(two, tiny_tokenizer, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- plans and their masks -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sparse_plan():
    """An unstructured plan of the tiny llama (magnitude needs no calibration), with its masks."""
    return sk.prune(make_tiny("llama"), None, "magnitude", 0.5)


def test_plan_show_refuses_a_missing_or_newer_plan(tmp_path, monkeypatch, capsys):
    err = _cli(monkeypatch, capsys, "plan", "show", str(tmp_path / "nowhere"))
    assert "Plan file not found:" in err and "Give a plan.json, or the run or model directory" in err
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"method": "magnitude", "kind": "unstructured", "ratio_target": 0.5,
                             "schema_version": 99}))
    err = _cli(monkeypatch, capsys, "plan", "show", str(tmp_path))
    assert "Plan schema 99 is newer than this shearkit reads" in err and "upgrade shearkit" in err


def test_plan_show_refuses_a_masks_file_that_is_not_one(sparse_plan, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    sparse_plan.save(tmp_path / "plan.json")
    (tmp_path / "masks.safetensors").unlink()
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "masks.safetensors"))  # weights, not masks
    err = _cli(monkeypatch, capsys, "plan", "show", str(tmp_path))
    assert "masks.safetensors is not a shearkit mask file" in err


def test_apply_plan_with_a_mask_file_that_is_not_there(sparse_plan, tmp_path):
    with pytest.raises(ShearkitError, match=r"Mask file not found: .*missing.safetensors"):
        sk.apply_plan(make_tiny("llama"), sparse_plan, masks=str(tmp_path / "missing.safetensors"))


def test_apply_plan_with_masks_of_another_model(sparse_plan, tmp_path):
    """Masks of another plan: of a model whose layers have other names, or other shapes."""
    from shearkit.sparsity import save_masks

    gpt2 = sk.prune(make_tiny("gpt2"), None, "magnitude", 0.5)
    save_masks(gpt2.masks, tmp_path / "gpt2")
    with pytest.raises(ShearkitError, match="No mask for layer 0 'self_attn.q_proj' in the mask file"):
        sk.apply_plan(make_tiny("llama"), sparse_plan, masks=str(tmp_path / "gpt2"))
    smaller = sk.prune(make_tiny("llama_tied"), None, "magnitude", 0.5)  # same names, hidden 48
    with pytest.raises(ShearkitError, match=r"has shape \(48, 48\) but the weight is \(64, 64\); the model is not"):
        sk.apply_plan(make_tiny("llama"), sparse_plan, masks=smaller.masks)


def test_apply_plan_to_a_model_with_fewer_layers_is_refused_before_zeroing(sparse_plan):
    """Was an IndexError from deep inside the model: the plan names a layer the model lacks."""
    from shearkit.surgery import remove_blocks

    model = make_tiny("llama")
    remove_blocks(model, [2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShearkitError, match="The plan sparsified layer 2, but the model has 2 layers"):
        sk.apply_plan(model, sparse_plan, check=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing zeroed


def test_plan_without_masks_loaded_with_another_model(sparse_plan, tmp_path):
    """Without its masks file a plan takes its masks from the model given; one that is not the plan's
    model is refused by name."""
    from shearkit.plan import Plan
    from shearkit.surgery import remove_blocks

    sparse_plan.save(tmp_path / "plan.json")
    (tmp_path / "masks.safetensors").unlink()
    shallow = make_tiny("llama")
    remove_blocks(shallow, [0])
    with pytest.raises(ShearkitError, match="sparsified layer 2, but the model has 2 layers; it is not the plan's"):
        Plan.load(tmp_path, model=shallow)
    with pytest.raises(ShearkitError, match="sparsified layer 0 'self_attn.q_proj', which the model does not have"):
        Plan.load(tmp_path, model=make_tiny("gpt2"))


def test_per_layer_sparsity_plot_of_a_structured_plan(tmp_path):
    from shearkit.sparsity.plot import plot_layer_sparsity

    plan = sk.prune(make_tiny("llama"), None, "structured-magnitude", 0.2, dry_run=True)
    with pytest.raises(ShearkitError, match="Per-layer sparsity exists for unstructured plans only; this plan is"):
        plot_layer_sparsity(plan, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_plan_save_cannot_keep_the_previous_masks(sparse_plan, tmp_path, monkeypatch):
    """Re-saving a plan keeps the previous masks aside (a hard link, else a copy) until the new plan.json
    is written; on a file system with neither (no links, disk full) the save is refused up front."""
    import errno
    import os
    import shutil

    from shearkit.io.atomic import WriteFailed

    sparse_plan.save(tmp_path / "plan.json")
    before = (tmp_path / "masks.safetensors").read_bytes()

    def no_link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copy2", full)
    with pytest.raises(WriteFailed, match=r"Could not write .*masks.safetensors: No space left on device"):
        sparse_plan.save(tmp_path / "plan.json")
    assert (tmp_path / "masks.safetensors").read_bytes() == before
