"""Each user-facing error of data/, calibration/, graph/ and importance/ made to happen, through the
CLI or the public API a user calls (docs/errors.md lists them; tools/errors_doc.py checks the list)."""
import json
import sys
import types

import pytest
import torch

import shearkit
from shearkit.errors import ShearkitError

from conftest import VOCAB, make_tiny

CALIB = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def cli(monkeypatch, capsys, *args):
    """Run `shearkit ARGS` in-process through main() (which turns a ShearkitError into exit 2)."""
    from shearkit.cli import main

    monkeypatch.setattr(sys, "argv", ["shearkit", *args])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err


@pytest.fixture
def no_data_dir(monkeypatch):
    """No local data directory and the hub switched off."""
    monkeypatch.delenv("SHEARKIT_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# -- data availability, checked before a model is loaded (data/availability.py) -------------------

def test_missing_calibration_file_is_named_before_the_model_loads(tmp_path, tiny_model_dir, text_file, monkeypatch,
                                                                   capsys):
    missing = tmp_path / "no" / "calib.txt"
    code, err = cli(monkeypatch, capsys, "prune", str(tiny_model_dir), "--method", "wanda", "--calib", str(missing),
                    "--tasks", str(text_file), "--out", str(tmp_path / "run"))
    assert code == 2 and f"(calibration): file not found: {missing}" in err
    assert not (tmp_path / "run").exists()


def test_a_set_missing_from_the_data_directory_is_named(tmp_path, tiny_model_dir, monkeypatch, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    code, err = cli(monkeypatch, capsys, "eval", str(tiny_model_dir), "--tasks", "ptb", "--data-dir", str(empty),
                    "--out", str(tmp_path / "run"))
    assert code == 2 and "Data set 'ptb' (evaluation) split 'test' needs" in err
    assert "ptb/test.txt, which is not in the data directory" in err


def test_a_set_without_hub_source_needs_the_data_directory(tmp_path, tiny_model_dir, text_file, no_data_dir,
                                                           monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, "prune", str(tiny_model_dir), "--method", "wanda", "--calib", "wiki",
                    "--tasks", str(text_file), "--out", str(tmp_path / "run"))
    assert code == 2 and "Data set 'wiki' (calibration) is not available" in err
    assert "it has no hub source" in err and "--data-dir" in err


def test_missing_instruction_file_is_named(tmp_path, tiny_model_dir, monkeypatch, capsys):
    missing = tmp_path / "no" / "chat.json"
    code, err = cli(monkeypatch, capsys, "recover", str(tiny_model_dir), "--data", str(missing), "--set",
                    "recover.mode=instruction", "--steps", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and f"Instruction file not found: {missing}" in err


def test_unknown_instruction_set_suggests_the_nearest(tmp_path, tiny_model_dir, monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, "recover", str(tiny_model_dir), "--data", "alpacca", "--set",
                    "recover.mode=instruction", "--steps", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and "Unknown data set 'alpacca'. Did you mean 'alpaca'?" in err


def test_an_instruction_set_missing_from_the_data_directory_is_named(tmp_path, tiny_model_dir, monkeypatch, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    code, err = cli(monkeypatch, capsys, "recover", str(tiny_model_dir), "--data", "alpaca", "--data-dir", str(empty),
                    "--steps", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and "Instruction set 'alpaca' needs" in err and "which is not in the data directory" in err


# -- reading data sets (data/sources.py) -----------------------------------------------------------

def test_a_blank_data_file_holds_no_text(tmp_path, tiny_model_dir, monkeypatch, capsys):
    d = tmp_path / "data"
    (d / "ptb").mkdir(parents=True)
    (d / "ptb" / "test.txt").write_text("\n  \n\n")
    code, err = cli(monkeypatch, capsys, "eval", str(tiny_model_dir), "--tasks", "ptb", "--data-dir", str(d),
                    "--seqlen", "16", "--device", "cpu", "--out", str(tmp_path / "run"))
    assert code == 2 and "Data set 'ptb':" in err and "holds no text" in err


def test_a_split_the_set_does_not_have_is_refused(tmp_path, tiny_model_dir, monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, "eval", str(tiny_model_dir), "--tasks", "wikitext2", "--split", "validation",
                    "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"))
    assert code == 2 and "has no split 'validation'; splits: test, train" in err


def test_missing_calibration_file_through_the_api(tmp_path, tiny_tokenizer):
    from shearkit.recipe import CalibConfig

    missing = tmp_path / "calib.txt"
    with pytest.raises(ShearkitError, match="Data file not found: .*calib.txt"):
        shearkit.prune(make_tiny("llama"), tiny_tokenizer, "wanda", 0.5, calib=CalibConfig(dataset=str(missing)))


def test_a_set_without_hub_source_through_the_api(tiny_tokenizer, no_data_dir):
    from shearkit.recipe import CalibConfig

    with pytest.raises(ShearkitError, match="Data set 'wiki' needs the local data directory: set \\$SHEARKIT_DATA"):
        shearkit.prune(make_tiny("llama"), tiny_tokenizer, "wanda", 0.5, calib=CalibConfig(dataset="wiki"))


def test_a_failed_hub_download_is_a_clear_error(tiny_tokenizer, no_data_dir, monkeypatch):
    from shearkit.recipe import CalibConfig

    def offline(*a, **k):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ShearkitError, match="Data set 'c4' was not found locally .* the hub did not provide "
                                            "allenai/c4 \\(ConnectionError: no route"):
        shearkit.prune(make_tiny("llama"), tiny_tokenizer, "wanda", 0.5, calib=CalibConfig(dataset="c4"))


RECOVER = {"steps": 1, "seqlen": 16, "batch_size": 1}


def test_missing_instruction_file_through_the_api(tmp_path, chat_tok):
    missing = tmp_path / "chat.json"
    with pytest.raises(ShearkitError, match="Instruction file not found: .*chat.json"):
        shearkit.recover(make_tiny("llama"), chat_tok, {**RECOVER, "data": str(missing), "mode": "instruction"})


def test_unknown_instruction_set_through_the_api(chat_tok):
    with pytest.raises(ShearkitError, match="Unknown data set 'alpacca'. Did you mean 'alpaca'"):
        shearkit.recover(make_tiny("llama"), chat_tok, {**RECOVER, "data": "alpacca", "mode": "instruction"})


def test_an_instruction_set_needs_the_data_directory(chat_tok, no_data_dir):
    with pytest.raises(ShearkitError, match="Instruction set 'alpaca' needs the local data directory"):
        shearkit.recover(make_tiny("llama"), chat_tok, {**RECOVER, "data": "alpaca"})


# -- calibration and held-out windows (data/calib.py, data/partition.py) ---------------------------

@pytest.mark.parametrize("n,seqlen", [(0, 16), (2, 1)])
def test_calibration_window_sizes_are_checked(tiny_tokenizer, text_file, n, seqlen):
    from shearkit.data import calibration_windows

    with pytest.raises(ShearkitError, match=f"Calibration needs n >= 1 windows of seqlen >= 2 tokens \\(got n={n}"):
        calibration_windows(tiny_tokenizer, str(text_file), n=n, seqlen=seqlen)


def test_calibrating_on_an_evaluation_split_would_leak(tiny_tokenizer, tmp_path):
    from shearkit.data import calibration_windows

    with pytest.raises(ShearkitError, match="'wikitext2' cannot be used for calibration from its test split: that "
                                            "would leak"):
        calibration_windows(tiny_tokenizer, "wikitext2", n=2, seqlen=16, split="test", data_dir=tmp_path)


@pytest.mark.parametrize("n,seqlen", [(0, 16), (2, 1)])
def test_window_sizes_of_a_part_are_checked(tiny_tokenizer, text_file, n, seqlen):
    from shearkit.data.partition import partition_rows, windows

    parts = partition_rows(tiny_tokenizer, str(text_file), {"held": 32})
    with pytest.raises(ShearkitError, match=f"Windows need n >= 1 and seqlen >= 2 \\(got n={n}, seqlen={seqlen}\\)"):
        windows(tiny_tokenizer, parts["held"], n, seqlen)


# -- blockwise calibration (calibration/blockwise.py) ----------------------------------------------

def test_a_block_returning_neither_tensor_nor_tuple_is_named():
    """A model whose decoder block returns a dict (here through a forward hook that wraps its output)."""
    model = make_tiny("llama")
    model.model.layers[1].register_forward_hook(lambda mod, args, out: {"hidden_states": out})
    with pytest.raises(ShearkitError, match="A decoder block returned dict; expected a tensor or a tuple"):
        shearkit.prune(model, None, "shortgpt", blocks=1, calib=CALIB)


def test_calibration_batch_size_is_checked():
    from shearkit.calibration import capture_inputs

    with pytest.raises(ShearkitError, match="batch_size must be >= 1, got 0"):
        capture_inputs(make_tiny("llama"), CALIB, batch_size=0)


def test_a_forward_that_skips_the_blocks_is_named():
    """config.num_hidden_layers below the blocks the model holds: its forward runs only that many."""
    model = make_tiny("llama")
    model.config.num_hidden_layers = 0
    with pytest.raises(ShearkitError, match="first decoder block was never called during calibration: .*"
                                            "num_hidden_layers is 0; the model holds 3 blocks"):
        shearkit.prune(model, None, "wanda", 0.5, calib=CALIB)


def test_a_block_the_forward_skips_gets_no_gradient():
    model = make_tiny("llama")
    model.config.num_hidden_layers = 2
    with pytest.raises(ShearkitError, match="No gradient reached model.layers.2.self_attn.q_proj: the model's forward"):
        shearkit.prune(model, None, "llm-pruner", 0.2, calib=CALIB)


def test_block_perplexity_needs_two_tokens_per_window():
    with pytest.raises(ShearkitError, match="Perplexity needs \\(samples, seqlen >= 2\\) tokens, got shape \\(2, 1\\)"):
        shearkit.prune(make_tiny("llama"), None, "shortgpt", blocks=1, importance="ppl", calib=CALIB[:, :1])


# -- dependency groups and the planner (graph/) ----------------------------------------------------

def test_plotting_a_model_without_decoder_blocks(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=0,
                                   num_attention_heads=4, num_key_value_heads=2)
    d = tmp_path / "no-blocks"
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    code, err = cli(monkeypatch, capsys, "graph", str(d), "--plot", str(tmp_path / "groups.png"), "--device", "cpu")
    assert code == 2 and "No per-layer groups to plot: the model has no decoder blocks" in err
    assert not (tmp_path / "groups.png").exists()


def test_an_embedding_lora_cannot_be_sliced_with_the_hidden_channels():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny("llama"), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ShearkitError, match="model.embed_tokens carries an embedding LoRA; merge it"):
        shearkit.describe_groups(model, hidden=True)


def test_dora_adapters_cannot_be_pruned():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                          use_dora=True))
    with pytest.raises(ShearkitError, match="self_attn.q_proj carries a DoRA magnitude vector, which shearkit cannot "
                                            "slice; use plain LoRA"):
        shearkit.prune(model, None, "structured-magnitude", 0.2)


def test_a_config_changed_after_it_was_built_is_still_checked_by_the_planner():
    from shearkit.methods import method_config

    cfg = method_config({"method": "structured-magnitude", "ratio": 0.2})
    cfg.attn_unit = "heads"
    with pytest.raises(ShearkitError, match="attn_unit must be one of kv_group, query_heads, none, got 'heads'"):
        shearkit.prune(make_tiny("llama"), None, cfg)


def _plan(model, **kw):
    """The structured planner as a method of one's own calls it (`methods/structured.py`)."""
    from shearkit.graph.planner import plan_structured
    from shearkit.importance import magnitude
    from shearkit.methods.structured import group_scores

    scores = group_scores(model, [0, 1, 2], "kv_group", lambda m, gs: magnitude(m, gs))
    args = dict(ratio=0.2, allocation="uniform", attn_unit="kv_group", round_to=8, dense=[], method="mine",
                config={})
    return plan_structured(model, scores, **{**args, **kw})


@pytest.mark.parametrize("kw,says", [
    ({"allocation": "even"}, "allocation must be one of uniform, global, got 'even'"),
    ({"allocation": "mine.json", "layer_ratios": [1.0, 1.0]}, "mine.json gives 2 layer ratios; the model has 3 layers"),
    ({"kind_ratios": {"attn": [1.0] * 3, "mlp": [1.0] * 3}}, "Per-kind ratios need per-layer ratios too"),
    ({"allocation": "mine.json", "layer_ratios": [1.0] * 3, "kind_ratios": {"attn": [1.0] * 3, "mlp": [1.0] * 2}},
     "mine.json gives 2 mlp ratios; the model has 3 layers"),
], ids=["allocation", "layer-ratios", "kinds-without-layers", "kind-ratios"])
def test_the_planner_checks_its_allocation(kw, says):
    with pytest.raises(ShearkitError, match=says):
        _plan(make_tiny("llama"), **kw)


# -- importance (importance/) ----------------------------------------------------------------------

def test_lora_guided_importance_needs_lora_on_every_projection(tiny_tokenizer, text_file):
    model = make_tiny("llama")
    with pytest.raises(ShearkitError, match="model.layers.0.mlp.gate_proj is not wrapped by LoRA; .* leave "
                                            "prune.target_modules unset"):
        shearkit.prune(model, tiny_tokenizer, "loraprune", 0.2, target_modules=["q_proj", "v_proj"],
                       train={"steps": 2, "data": str(text_file), "seqlen": 16, "batch_size": 2})
    assert not any("lora" in n for n, _ in model.named_parameters())  # given back without the adapters


def test_lora_factors_and_their_gradients_are_checked():
    from peft import LoraConfig, get_peft_model

    from shearkit.importance.lora_grad import g_hat

    model = get_peft_model(make_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ShearkitError, match="Linear carries no LoRA adapter 'other'; LoRA-guided importance needs"):
        g_hat(q, "other")
    with pytest.raises(ShearkitError, match="The LoRA factors have no gradient; compute the loss's backward pass"):
        g_hat(q)


@pytest.mark.parametrize("weights", [{"magnitude": -1.0, "cosine": 1.0}, {"magnitude": 0.0}], ids=["negative", "zero"])
def test_saliency_weights_are_checked(weights):
    with pytest.raises(ShearkitError, match="Saliency weights must be >= 0 with at least one > 0"):
        shearkit.prune(make_tiny("llama"), None, "lorashear", 0.2, saliency=weights)


def test_score_functions_check_their_arguments():
    from shearkit.graph import GroupSet, mlp_channels
    from shearkit.importance import collect_stats, magnitude, taylor, wanda

    model = make_tiny("llama")
    gs = mlp_channels(model, 0)
    with pytest.raises(ShearkitError, match="Magnitude norm must be 1 or 2, got 3"):
        magnitude(model, gs, p=3)
    with pytest.raises(ShearkitError, match="A group set with no base tensors cannot be scored"):
        magnitude(model, GroupSet("mlp_channel", 0, 4, []))
    stats = collect_stats(model, CALIB[:1], grads=True, act_norms=False)
    with pytest.raises(ShearkitError, match="Unknown Taylor variant 'matrix'; choose one of element, vector"):
        taylor(model, gs, stats, variant="matrix")
    with pytest.raises(ShearkitError, match="Wanda importance needs activation norms: collect statistics with "
                                            "act_norms=True"):
        wanda(model, gs, stats)


def test_hidden_channels_have_no_block_statistics():
    """collect_stats records the blocks' linear layers; the hidden channels reach the embedding too."""
    from shearkit.graph import hidden_channels
    from shearkit.importance import collect_stats, taylor, wanda

    model = make_tiny("llama")
    stats = collect_stats(model, CALIB[:1], grads=True, act_norms=True)
    with pytest.raises(ShearkitError, match="A group touches a tensor without a recorded gradient: collect_stats"):
        taylor(model, hidden_channels(model), stats)
    with pytest.raises(ShearkitError, match="No activation statistics for model.embed_tokens: collect_stats"):
        wanda(model, hidden_channels(model), stats)


def test_flexigpt_base_selection_is_checked():
    from shearkit.methods import method_config

    cfg = method_config({"method": "flexigpt", "blocks": 1, "training": False})
    cfg.select = "svd"  # changed after the config was built
    with pytest.raises(ShearkitError, match="prune.select must be one of lowrank, plain, got 'svd'"):
        shearkit.prune(make_tiny("llama"), None, cfg, calib=CALIB)


def test_flexigpt_refuses_blocks_no_kept_block_matches(tmp_path):
    """After structured pruning with per-layer ratios every block has widths of its own, so none can
    lend its weights to another."""
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"layer_ratios": [1, 2, 0]}))
    model = make_tiny("llama")
    shearkit.prune(model, None, "structured-magnitude", 0.2, allocation=str(alloc), round_to=1)
    with pytest.raises(ShearkitError, match="have projection widths no kept block has \\(per-layer widths\\)"):
        shearkit.prune(model, None, "flexigpt", blocks=1, calib=CALIB, training=False)


@pytest.mark.parametrize("pruned", [[], [0, 1, 2]])
def test_base_selection_needs_pruned_and_kept_blocks(pruned):
    """FlexiGPT's base selection (importance.shared_base.choose_bases, reusable on its own) refuses a
    selection with nothing pruned or nothing kept."""
    from shearkit.importance.shared_base import choose_bases

    with pytest.raises(ShearkitError, match="Base selection needs pruned and kept blocks"):
        choose_bases(make_tiny("llama"), pruned, rank=2)
