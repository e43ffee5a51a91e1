"""User-facing errors of the command line, recipes, the pipeline and LoRA recovery: each test makes one
error of docs/errors.md happen the way a user would meet it (a command, a recipe, a call of the Python
API) and checks its type and what it says.

Command-line errors go through `main()` in this process (the way `shearkit` runs: one line on stderr,
exit status 2); they are all raised before any model is loaded, so no model is named that exists.
"""
from __future__ import annotations

import copy
import errno
import json
import math
import os
import sys

import pytest
import torch

from conftest import make_tiny
from shearkit.errors import ShearkitError


# -- helpers -------------------------------------------------------------------------------------------

def cli(monkeypatch, capsys, tmp_path, *args) -> str:
    """Run `shearkit ARGS` in-process from `tmp_path`; assert it failed with a user error (exit status 2,
    no traceback) and return its stderr on one line."""
    from shearkit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["shearkit", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and "error:" in err, err
    return " ".join(err.split())


def _cfg(data, **kw) -> dict:
    """A tiny recovery run: one step of one 16-token window."""
    return {"data": str(data), "steps": 1, "seqlen": 16, "batch_size": 1, "warmup": 0, **kw}


def _sparse_llama():
    """A tiny llama with half of its block weights zero (unstructured magnitude pruning) and its plan."""
    import shearkit as sk

    model = make_tiny("llama")
    plan = sk.prune(model, None, "magnitude", 0.5)
    return model, plan


# -- command line: flags ---------------------------------------------------------------------------------

CLI_FLAG_ERRORS = [
    # cli/app.py pick_model
    (["eval", "model-a", "--model", "model-b"], "Two models given ('model-a' and --model 'model-b'); give one."),
    # cli/app.py check_resume_flags
    (["recover", "smollm2-135m", "--resume"], "--resume needs --out pointing at the run directory"),
    # cli/analysis_cmds.py analyze_cmd
    (["analyze", "smollm2-135m", "--ratio", "0.2", "--out", "s.json", "--tokens", "100", "--seqlen", "512"],
     "--tokens (100) must hold at least one window of --seqlen (512 >= 2) tokens."),
    (["analyze", "smollm2-135m", "--ratio", "0.2", "--out", "s.json", "--seqlen", "1"],
     "must hold at least one window of --seqlen (1 >= 2)"),
    # cli/core.py bench_cmd
    (["bench", "smollm2-135m", "--batch", "0"], "--batch must be at least 1, got 0."),
    (["bench", "smollm2-135m", "--decode-tokens", "-1"], "--decode-tokens must be at least 1, got -1."),
    # cli/export_cmds.py export_cmd
    (["export", "smollm2-135m", "--format", "onnx", "--out", "m.onnx"],
     "--format must be one of gguf, got 'onnx'. For Hugging Face or compressed-tensors folders use"),
    # cli/prune_cmds.py prune_cmd
    (["prune", "smollm2-135m", "--method", "wanda", "--ratio", "0.2", "--sparsity", "0.5"],
     "Give --ratio or --sparsity, not both."),
    (["prune", "smollm2-135m", "--ratio", "0.2"], "No method given: pass --method (see `shearkit list`"),
    # cli/prune_cmds.py run_cmd
    (["run"], "Give a recipe (a YAML file, or a shipped name such as `quick`) or --method and --ratio."),
    (["run", "--method", "wanda", "--ratio", "1.5"], "--ratio must be strictly between 0 and 1 (got 1.5)."),
    # cli/recover_cmds.py run_recover
    (["recover", "smollm2-135m", "--distill", "0.5"], "--distill needs --teacher, the dense model to distil from."),
    (["recover", "smollm2-135m", "--set", "recover.merge=false"],
     "The recover command saves the merged model; set recover.merge true"),
    # pipeline.py run_pipeline
    (["prune", "smollm2-135m", "--method", "magnitude", "--ratio", "0.5", "--save-format", "onnx"],
     "save_format must be one of dense, compressed-tensors, gguf, none, got 'onnx'."),
    # recipe.py CalibConfig / EvalConfig
    (["prune", "smollm2-135m", "--method", "wanda", "--calib-samples", "0"],
     "calib.samples must be >= 1 and calib.seqlen >= 2 (got 0, 512)."),
    (["prune", "smollm2-135m", "--method", "wanda", "--calib-seqlen", "1"], "calib.seqlen >= 2 (got 64, 1)."),
    (["eval", "smollm2-135m", "--tasks", ","], "eval.tasks is empty; name at least one task"),
    (["eval", "smollm2-135m", "--seqlen", "1"], "--seqlen must be at least 2, got 1."),
    (["eval", "smollm2-135m", "--batch-size", "0"], "--batch-size must be at least 1, got 0."),
]


CLI_FLAG_IDS = ["two-models", "resume-without-out", "analyze-tokens", "analyze-seqlen", "bench-batch",
                "bench-decode-tokens", "export-format", "ratio-and-sparsity", "prune-no-method", "run-nothing",
                "run-ratio", "recover-distill-no-teacher", "recover-no-merge", "save-format", "calib-samples",
                "calib-seqlen", "eval-no-tasks", "eval-seqlen", "eval-batch-size"]


@pytest.mark.parametrize("args,says", CLI_FLAG_ERRORS, ids=CLI_FLAG_IDS)
def test_cli_flag_errors(args, says, monkeypatch, capsys, tmp_path):
    err = cli(monkeypatch, capsys, tmp_path, *args)
    assert says in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before any run directory


def test_extend_resume_of_a_run_that_trains_nothing(monkeypatch, capsys, tmp_path):
    (tmp_path / "run").mkdir()
    err = cli(monkeypatch, capsys, tmp_path, "extend", "smollm2-135m", "--add-blocks", "2", "--steps", "0",
              "--resume", "--out", "run")
    assert "--resume continues the training, and this run trains nothing (extend.training false)." in err


# -- command line: recipes ---------------------------------------------------------------------------------

def test_recipe_with_nothing_to_run(monkeypatch, capsys, tmp_path):
    (tmp_path / "r.yaml").write_text("model: {name: smollm2-135m}\neval: {tasks: [wikitext2]}\n")
    err = cli(monkeypatch, capsys, tmp_path, "run", "r.yaml")
    assert "The recipe has neither a 'prune' nor a 'recover' section: nothing to run. Add e.g." in err


@pytest.mark.parametrize("section,command", [
    ("recover", ["run", "r.yaml"]),  # a section a subsystem owns (recover)
    ("recover", ["recover", "smollm2-135m", "--recipe", "r.yaml"]),  # ... which the command's flags also fill
    ("eval", ["prune", "smollm2-135m", "--method", "wanda", "--recipe", "r.yaml"]),  # a static section
], ids=["run-recover", "recover-recover", "prune-eval"])
def test_recipe_section_that_is_not_a_mapping(section, command, monkeypatch, capsys, tmp_path):
    (tmp_path / "r.yaml").write_text(f"prune: {{method: wanda, ratio: 0.5}}\n{section}: 5\n")
    err = cli(monkeypatch, capsys, tmp_path, *command)
    assert f"Recipe section '{section}' must be a mapping of keys to values." in err


RECOVER_CONFIG_ERRORS = [
    (["--seqlen", "1"], "recover.seqlen must be at least 2, got 1."),
    (["--lr", "0"], "recover.lr must be positive, got 0.0."),
    (["--alpha", "-1"], "recover.alpha must be positive, got -1.0."),
    (["--set", "recover.dropout=1"], "recover.dropout must be in [0, 1), got 1.0."),
    (["--set", "recover.mode=chat"], "recover.mode must be one of auto, instruction, text, got 'chat'."),
    (["--set", "recover.warmup=-0.1"], "recover.warmup must be >= 0 (a fraction of steps below 1, else steps)"),
    (["--eval-every", "-1"], "recover.eval_every must be >= 0 (0 disables it), got -1."),
    (["--set", "recover.max_grad_norm=-1"], "recover.max_grad_norm must be >= 0 (0 disables it), got -1.0."),
    (["--teacher", "t", "--distill", "1.5"], "recover.distill_weight must be in [0, 1], got 1.5."),
    (["--set", "recover.distill_temperature=0"], "recover.distill_temperature must be positive, got 0.0."),
    (["--set", "recover.eval_limit=0"], "recover.eval_limit must be a positive number of windows, got 0."),
    (["--eval-every", "5", "--set", "recover.eval_tasks=[]"],
     "recover.eval_every is set but recover.eval_tasks is empty; name a set"),
    (["--set", "recover.target_modules=[]"], "recover.target_modules is empty; leave it unset"),
]


@pytest.mark.parametrize("args,says", RECOVER_CONFIG_ERRORS,
                         ids=["seqlen", "lr", "alpha", "dropout", "mode", "warmup", "eval_every", "max_grad_norm",
                              "distill_weight", "distill_temperature", "eval_limit", "eval_tasks", "target_modules"])
def test_recover_settings(args, says, monkeypatch, capsys, tmp_path):
    err = cli(monkeypatch, capsys, tmp_path, "recover", "smollm2-135m", *args)
    assert says in err, err


DYNAMIC_CONFIG_ERRORS = [
    ("prune.dynamic.round_steps=0", "dynamic.round_steps must be at least 1, got 0."),
    ("prune.dynamic.eval_batch_size=0", "dynamic.eval_batch_size must be at least 1, got 0."),
    ("prune.dynamic.heldout_seqlen=1", "dynamic.heldout_seqlen must be at least 2, got 1."),
    ("prune.dynamic.floor=1.5", "dynamic.floor must be in [0, 1], got 1.5."),
    ("prune.dynamic.tolerance=-0.1", "dynamic.tolerance must be >= 0, got -0.1."),
    ("prune.dynamic.phase_steps=[10]",
     "dynamic.phase_steps must give a positive number of steps for each of the 2 phases, got [10]."),
    ("prune.dynamic.phase_steps=[10, 0]", "for each of the 2 phases, got [10, 0]."),
]


@pytest.mark.parametrize("override,says", DYNAMIC_CONFIG_ERRORS, ids=[
    "round_steps", "eval_batch_size", "heldout_seqlen", "floor", "tolerance", "phase_steps-count", "phase_steps-zero"])
def test_lorashear_dynamic_recovery_settings(override, says, monkeypatch, capsys, tmp_path):
    err = cli(monkeypatch, capsys, tmp_path, "prune", "smollm2-135m", "--method", "lorashear", "--ratio", "0.2",
              "--set", override)
    assert says in err, err


# -- Python API ---------------------------------------------------------------------------------------------

def test_zero_shot_tasks_without_the_zero_shot_module(monkeypatch):
    """An install without the zero-shot evaluation module (a stripped build) still knows the
    perplexity sets and refuses any other task name up front."""
    from shearkit import api

    monkeypatch.setitem(sys.modules, "shearkit.eval.zeroshot", None)  # the module cannot be imported
    assert api.check_tasks("wikitext2,notes.txt") == (["wikitext2", "notes.txt"], [])
    with pytest.raises(ShearkitError, match=r"Unknown task\(s\) piqa, boolq: zero-shot tasks are not available in "
                                            r"this installation; name a perplexity set \(wikitext2, .*\) or a "
                                            r"\.txt/\.jsonl file\."):
        api.check_tasks(["wikitext2", "piqa", "boolq"])


def test_export_gguf_of_a_model_object_needs_its_tokenizer(tmp_path):
    from shearkit import api

    with pytest.raises(ShearkitError, match="export_gguf needs the tokenizer with a model object"):
        api.export_gguf(make_tiny("llama"), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# -- recover(): its inputs -------------------------------------------------------------------------------------

def test_recover_config_of_the_wrong_type(tiny_tokenizer):
    from shearkit.recovery import RecoverConfig, recover

    with pytest.raises(ShearkitError, match=r"recover\(\) takes a RecoverConfig or a dict, got list"):
        recover(make_tiny("llama"), tiny_tokenizer, [RecoverConfig()])


def test_teacher_with_another_vocabulary(tiny_tokenizer, text_file):
    from shearkit.recovery import recover

    teacher = make_tiny("llama")
    teacher.resize_token_embeddings(400)
    with pytest.raises(ShearkitError, match=r"The teacher's vocabulary \(400\) differs from the model's \(320\); "
                                            "distil from the dense model"):
        recover(make_tiny("llama"), tiny_tokenizer, _cfg(text_file, distill_weight=0.5), teacher=teacher)


def test_training_split_a_data_set_does_not_have(tiny_tokenizer):
    from shearkit.recovery import recover

    with pytest.raises(ShearkitError, match="Data set 'c4' has no 'validation' split to train on "
                                            r"\(splits: train\); use recover.data c4 or wiki"):
        recover(make_tiny("llama"), tiny_tokenizer, {"data": "c4", "split": "validation", "steps": 1})


def test_instructions_whose_prompts_fill_the_whole_length(tiny_tokenizer, tmp_path):
    from shearkit.recovery import recover

    data = tmp_path / "inst.json"
    data.write_text(json.dumps([{"instruction": "tell me about the quick brown fox " * 3, "input": "",
                                 "output": "it jumps"}] * 4))
    with pytest.raises(ShearkitError, match="Every prompt in '.*inst.json' is longer than recover.seqlen=8 tokens, "
                                            "so no response token is left to train on; raise seqlen."):
        recover(make_tiny("llama"), tiny_tokenizer, _cfg(data, seqlen=8))


def test_lora_targets_of_two_kinds(tiny_tokenizer, text_file):
    """GPT-2's block projections are Conv1D, its output head a Linear: one LoRA config cannot take both."""
    from shearkit.recovery import recover

    with pytest.raises(ShearkitError, match="LoRA targets mix Conv1D and Linear modules; give targets of one kind."):
        recover(make_tiny("gpt2"), tiny_tokenizer, _cfg(text_file, target_modules=["c_attn", "lm_head"]))


def test_masks_argument_that_is_not_a_mask(tiny_tokenizer, text_file):
    from shearkit.recovery import recover

    with pytest.raises(ShearkitError, match="masks must be a Plan, a mapping of module name to keep-mask, 'auto' or "
                                            "None; got 'zeros'."):
        recover(make_tiny("llama"), tiny_tokenizer, _cfg(text_file), masks="zeros")


def test_masks_of_another_model(tiny_tokenizer, text_file):
    """The masks of a wider model (or another family) do not fit this model's weights."""
    from shearkit.recovery import recover

    masks = {"model.layers.0.self_attn.q_proj": torch.ones(128, 64, dtype=torch.bool)}
    with pytest.raises(ShearkitError, match=r"The mask of model.layers.0.self_attn.q_proj has shape \(128, 64\), "
                                            r"the weight \(64, 64\): the masks belong to another model."):
        recover(make_tiny("llama"), tiny_tokenizer, _cfg(text_file), masks=masks)


def _user_peft(model, **lora):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **lora))


def test_sparse_model_with_lora_on_its_embeddings(tiny_tokenizer, text_file):
    """A peft model the user built with LoRA on the (sparse) embeddings: masked LoRA cannot keep those zeros."""
    from shearkit.recovery import recover

    model = make_tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, ::2] = 0  # half the embedding is zero
    peft_model = _user_peft(model, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ShearkitError, match=r"model.embed_tokens is a Embedding LoRA layer; masked "
                                            r"\(sparsity-keeping\) LoRA supports plain Linear and Conv1D layers."):
        recover(peft_model, tiny_tokenizer, _cfg(text_file))


def test_sparse_model_with_dora_adapters(tiny_tokenizer, text_file):
    from shearkit.recovery import recover

    model, _ = _sparse_llama()
    peft_model = _user_peft(model, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ShearkitError, match=r"model.layers.0.self_attn.q_proj uses a LoRA variant \(e.g. DoRA\); "
                                            "masked LoRA supports plain LoRA only."):
        recover(peft_model, tiny_tokenizer, _cfg(text_file))


def test_adapters_loaded_for_inference_only(tiny_tokenizer, text_file, tmp_path):
    """PeftModel.from_pretrained loads adapters frozen unless is_trainable=True: nothing to train."""
    from peft import PeftModel

    from shearkit.recovery import recover

    _user_peft(make_tiny("llama"), target_modules=["q_proj"]).save_pretrained(tmp_path / "adapter")
    frozen = PeftModel.from_pretrained(make_tiny("llama"), tmp_path / "adapter")
    with pytest.raises(ShearkitError, match="The model has no trainable adapter parameters: unfreeze them "
                                            ".*is_trainable=True"):
        recover(frozen, tiny_tokenizer, _cfg(text_file))


def test_masked_lora_refuses_per_example_adapters(tiny_tokenizer, text_file):
    """A sparse model recovered without merging keeps masked LoRA layers: peft's mixed-batch inference
    (adapter_names) cannot go through them."""
    from shearkit.recovery import recover

    model, plan = _sparse_llama()
    peft_model, history = recover(model, tiny_tokenizer, _cfg(text_file, merge=False), masks=plan)
    assert history["masked_layers"] > 0
    ids = torch.randint(0, 320, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ShearkitError, match="Masked LoRA layers do not take per-example adapter_names; "
                                            "call the model without"):
        peft_model(input_ids=ids, adapter_names=["default", "default"])


# -- recover(): checkpoints and the training log ---------------------------------------------------------------

@pytest.fixture
def checkpointed(tiny_tokenizer, text_file, tmp_path):
    """A two-step recovery run that checkpointed after each step."""
    from shearkit.recovery import recover

    out = tmp_path / "run"
    cfg = _cfg(text_file, steps=2, save_every=1)
    _, h = recover(make_tiny("llama"), tiny_tokenizer, cfg, out_dir=out)
    assert h["steps_done"] == 2 and (out / "recovery" / "checkpoint-2").is_dir()
    return out, cfg


def test_resume_from_an_incomplete_checkpoint(checkpointed, tiny_tokenizer):
    from shearkit.recovery import recover

    out, cfg = checkpointed
    ckpt = out / "recovery" / "checkpoint-2"
    (ckpt / "optimizer.safetensors").unlink()  # damaged: the state file is there, a tensor file is not
    with pytest.raises(ShearkitError, match=r"Checkpoint .*checkpoint-2 is incomplete \(missing "
                                            r"optimizer.safetensors\); delete it to resume from an earlier one."):
        recover(make_tiny("llama"), tiny_tokenizer, cfg, out_dir=out, resume=True)


def test_resume_with_another_number_of_processes(checkpointed, tiny_tokenizer):
    """A checkpoint written by a two-process launch (`accelerate launch --num_processes 2`) resumed by one process."""
    from shearkit.recovery import recover

    out, cfg = checkpointed
    state = out / "recovery" / "checkpoint-2" / "trainer_state.json"
    st = json.loads(state.read_text())
    st["processes"] = 2
    state.write_text(json.dumps(st))
    with pytest.raises(ShearkitError, match=r"Checkpoint .*checkpoint-2 was written by 2 process\(es\); "
                                            r"resume with the same number \(now 1\) so each step sees the same "
                                            "batches."):
        recover(make_tiny("llama"), tiny_tokenizer, cfg, out_dir=out, resume=True)


class _FailingLog:
    """Opening (`at="open"`) or writing (`at="write"`) train_log.jsonl for appending fails with `code`, as on a
    full disk or one remounted read-only mid-run; every other file is written as usual."""

    def __init__(self, monkeypatch, at: str, code: int):
        self.at, self.code, self.fds = at, code, set()
        self._open, self._write = os.open, os.write
        monkeypatch.setattr(os, "open", self.open)
        monkeypatch.setattr(os, "write", self.write)

    def open(self, path, flags, *a, **k):
        mine = str(path).endswith("train_log.jsonl") and flags & os.O_APPEND
        if mine and self.at == "open":
            raise OSError(self.code, os.strerror(self.code), str(path))
        fd = self._open(path, flags, *a, **k)
        if mine:
            self.fds.add(fd)
        return fd

    def write(self, fd, data):
        if fd in self.fds:
            raise OSError(self.code, os.strerror(self.code))
        return self._write(fd, data)


@pytest.mark.parametrize("at,code,says", [
    ("open", errno.EROFS, "Make .* writable for this user"),
    ("write", errno.ENOSPC, "Free space on the disk"),
], ids=["open-read-only", "write-disk-full"])
def test_training_log_that_cannot_be_written(at, code, says, tiny_tokenizer, text_file, tmp_path, monkeypatch):
    from shearkit.io.atomic import WriteFailed
    from shearkit.recovery import recover

    log = tmp_path / "run" / "recovery" / "train_log.jsonl"
    _FailingLog(monkeypatch, at, code)
    with pytest.raises(WriteFailed, match=f"Could not write {log}: {os.strerror(code)}. {says}.* "
                                          f"The previous {log} is unchanged."):
        recover(make_tiny("llama"), tiny_tokenizer, _cfg(text_file), out_dir=tmp_path / "run")
    assert log.read_text() == ""  # no torn record


# -- the Trainer (the training loop methods and recover() share) ---------------------------------------------

@pytest.fixture
def trainer_parts(tiny_tokenizer, text_file):
    from peft import get_peft_model

    from shearkit.recovery.config import RecoverConfig
    from shearkit.recovery.data import build_train_data
    from shearkit.recovery.lora import lora_config

    model = make_tiny("llama")
    peft_model = get_peft_model(model, lora_config(model, 4, 8.0, 0.0))
    cfg = RecoverConfig(**_cfg(text_file, save_every=1))
    return peft_model, build_train_data(tiny_tokenizer, cfg.data, seqlen=cfg.seqlen), cfg


def test_trainer_resume_without_a_folder(trainer_parts, tiny_tokenizer):
    from shearkit.recovery.loop import Trainer

    model, data, cfg = trainer_parts
    with pytest.raises(ShearkitError, match=r"resume=True needs a training folder \(root\) whose checkpoints"):
        Trainer(model, tiny_tokenizer, data, cfg).fit(resume=True)


def test_trainer_optimizer_that_is_neither_a_name_nor_a_factory(trainer_parts, tiny_tokenizer):
    from shearkit.recovery.loop import Trainer

    model, data, cfg = trainer_parts
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])  # an optimizer, not a factory
    with pytest.raises(ShearkitError, match=r"optimizer must be a name \(adamw, sgd\) or a callable "
                                            r"factory\(params, config\), got AdamW."):
        Trainer(model, tiny_tokenizer, data, cfg, optimizer=opt)


def test_callback_state_that_cannot_be_checkpointed(trainer_parts, tiny_tokenizer, tmp_path):
    from shearkit.recovery.loop import Callback, Trainer

    class Seen(Callback):
        name = "seen"

        def __init__(self):
            self.steps = set()

        def on_step_end(self, trainer, step, record):
            self.steps.add(step)

        def state_dict(self):
            return {"steps": self.steps}  # a set: not JSON

    model, data, cfg = trainer_parts
    with pytest.raises(ShearkitError, match=r"A callback's state_dict\(\) holds a value that is neither a tensor "
                                            r"nor JSON-able \(.*set.*\); return tensors, numbers, strings, lists "
                                            "or dicts."):
        Trainer(model, tiny_tokenizer, data, cfg, callbacks=[Seen()], root=tmp_path / "t").fit()
    assert not list((tmp_path / "t").glob("checkpoint-*"))


# -- dynamic recovery and training mixtures ---------------------------------------------------------------------

def test_mix_weights_of_no_source():
    from shearkit.recovery.dynamic import mix_weights

    with pytest.raises(ShearkitError, match="mix_weights needs at least one source."):
        mix_weights({}, 0.1)


def test_dense_reference_of_a_slice_of_the_wrong_kind(tiny_tokenizer):
    from shearkit.recovery.dynamic import dense_reference

    with pytest.raises(ShearkitError, match=r"A held-out slice is a \(windows, seqlen\) LongTensor or instruction "
                                            "TrainData, got list."):
        dense_reference(make_tiny("llama"), tiny_tokenizer, {"notes": [[1, 2, 3], [4, 5, 6]]})


@pytest.mark.parametrize("bad", [math.nan, 0.0, -3.0])
def test_dynamic_recovery_with_a_bad_dense_reference(bad, tiny_tokenizer):
    from shearkit.recovery.config import RecoverConfig
    from shearkit.recovery.data import TrainData
    from shearkit.recovery.dynamic import DynamicConfig, dynamic_recover
    from shearkit.recovery.mixture import MixtureData

    train = MixtureData.join({"a": TrainData([[1, 2, 3]] * 4, [[1, 2, 3]] * 4, "text"),
                              "b": TrainData([[4, 5, 6]] * 4, [[4, 5, 6]] * 4, "text")})
    heldout = {s: torch.tensor([[1, 2, 3, 4]]) for s in ("a", "b")}
    with pytest.raises(ShearkitError, match="dynamic recovery: dense reference perplexities must be finite and "
                                            r"positive, got \{'b': "):
        dynamic_recover(make_tiny("llama"), tiny_tokenizer, RecoverConfig(data="mixture", steps=1),
                        DynamicConfig(phases=[["a", "b"]]), train=train, heldout=heldout,
                        dense={"a": 12.0, "b": bad}, root=None)


def test_mixture_of_no_source():
    from shearkit.recovery.mixture import MixtureData, MixtureSampler

    with pytest.raises(ShearkitError, match="A training mixture needs at least one source."):
        MixtureData.join({})
    with pytest.raises(ShearkitError, match="A mixture sampler needs at least one source."):
        MixtureSampler({}, 1, 1, 1, 0)


@pytest.mark.parametrize("weights", [{"a": -1.0, "b": 2.0}, {"a": math.inf}, {"a": math.nan, "b": 1.0}],
                         ids=["negative", "inf", "nan"])
def test_mixture_weights_that_are_not_finite_and_non_negative(weights):
    from shearkit.recovery.mixture import MixtureSampler

    sampler = MixtureSampler({"a": (0, 4), "b": (4, 8)}, 2, 1, 1, 0)
    with pytest.raises(ShearkitError, match="Mixture weights must be finite and >= 0, got"):
        sampler.set_weights(3, weights)
    with pytest.raises(ShearkitError, match="Mixture weights must be finite and >= 0"):
        MixtureSampler({"a": (0, 4), "b": (4, 8)}, 2, 1, 1, 0, weights=weights)


def test_mixture_round_before_step_zero():
    from shearkit.recovery.mixture import MixtureSampler

    sampler = MixtureSampler({"a": (0, 4), "b": (4, 8)}, 2, 1, 1, 0)
    with pytest.raises(ShearkitError, match=r"A round cannot start before step 0 \(got -1\)."):
        sampler.set_weights(-1, {"a": 1.0})


# -- LHSPG (LoRAShear's optimizer) -------------------------------------------------------------------------------

@pytest.fixture
def lhspg_parts():
    from peft import get_peft_model

    from shearkit.arch.modules import unwrap
    from shearkit.graph.groups import layer_groups
    from shearkit.recovery.lora import lora_config

    model = make_tiny("llama")
    peft_model = get_peft_model(model, lora_config(model, 4, 8.0, 0.0))
    sets = {(kind, 1): gs for kind, gs in layer_groups(unwrap(peft_model), 1, "kv_group").items()}
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, params, sets


def _lhspg(parts, quotas=None, **kw):
    from shearkit.recovery.lhspg import LHSPG

    model, params, sets = parts
    quotas = {("kv_group", 1): 1} if quotas is None else quotas
    return LHSPG(params, model, sets, quotas, **{"lr": 1e-3, "warmup": 0, "periods": 1, "period_steps": 2, **kw})


@pytest.mark.parametrize("kw,says", [
    ({"variant": "fast"}, "LHSPG variant must be one of paper, decay, got 'fast'."),
    ({"warmup": -1}, r"LHSPG needs warmup >= 0, periods >= 1 and period_steps >= 1 \(got -1, 1, 2\)."),
    ({"periods": 0}, r"\(got 0, 0, 2\)"),
    ({"period_steps": 0}, r"\(got 0, 1, 0\)"),
    ({"epsilon": 1.0}, r"LHSPG epsilon must be in \[0, 1\), got 1.0."),
], ids=["variant", "warmup", "periods", "period_steps", "epsilon"])
def test_lhspg_settings(kw, says, lhspg_parts):
    with pytest.raises(ShearkitError, match=says):
        _lhspg(lhspg_parts, **kw)


def test_lhspg_quota_that_removes_every_group(lhspg_parts):
    _, _, sets = lhspg_parts
    n = sets[("kv_group", 1)].size
    with pytest.raises(ShearkitError, match=f"LHSPG quota {n} for kv_group of layer 1 must leave at least one of its "
                                            f"{n} groups."):
        _lhspg(lhspg_parts, quotas={("kv_group", 1): n})


def test_lhspg_state_of_the_other_variant(lhspg_parts):
    state = _lhspg(lhspg_parts, variant="paper").lhspg_state()
    decay = _lhspg(lhspg_parts, variant="decay")
    with pytest.raises(ShearkitError, match="The checkpoint was written by LHSPG variant 'paper', this run uses "
                                            "'decay'; use the same variant or a new run directory."):
        decay.load_lhspg_state(copy.deepcopy(state))
