"""The method core: module helpers' one home, the method context, the structured base and its
allocations, and the import direction (the lower layers never import the method registry)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import shearkit as sk
from shearkit.arch import get_adapter
from shearkit.errors import ShearkitError
from shearkit.graph import base_block_params, kv_groups, layer_geometry, layer_groups, mlp_channels
from shearkit.graph.planner import plan_structured
from shearkit.importance import collect_stats, magnitude, taylor
from shearkit.methods import (ALL_FAMILIES, METHODS, MethodContext, PruneMethod, _CLASSES, get_method,
                              method_config, register_method)
from shearkit.methods.structured import StructuredMethod, end_layers, group_scores

from conftest import VOCAB, make_tiny

SRC = Path(sk.__file__).parent
CALIB = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


# -- import direction and one home for the module helpers ------------------------------------

def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    pkg = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_lower_layers_do_not_import_the_methods():
    offenders = {}
    for sub in ("graph", "sparsity", "importance", "surgery", "arch"):
        for f in (SRC / sub).rglob("*.py"):
            bad = {m for m in _imports(f) if m == "shearkit.methods" or m.startswith("shearkit.methods.")}
            if bad:
                offenders[str(f.relative_to(SRC))] = sorted(bad)
    assert not offenders, offenders
    assert "shearkit.methods.base" in _imports(SRC / "methods" / "blockwise.py")  # the resolver sees imports


def test_module_helpers_are_defined_once():
    helpers = {"unwrap", "is_conv1d", "is_lora_layer", "base_module", "module_shape", "weight_view"}
    where = {}
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in helpers:
                where.setdefault(node.name.lstrip("_"), []).append(str(f.relative_to(SRC)))
    # io/remote_code.py is saved beside models and imports nothing of shearkit: its Conv1D test is its own
    where["is_conv1d"] = [p for p in where.get("is_conv1d", []) if p != "io/remote_code.py"]
    assert where == {h: ["arch/modules.py"] for h in helpers}


def test_weight_view_is_out_in_and_shares_storage():
    from shearkit.arch.modules import base_module, module_shape, unwrap, weight_view
    from test_graph import _lora

    gpt2 = make_tiny("gpt2")
    c_fc = gpt2.transformer.h[0].mlp.c_fc  # Conv1D, stored (in, out) = (64, 96)
    assert c_fc.weight.shape == (64, 96) and weight_view(c_fc).shape == (96, 64) == module_shape(c_fc)
    assert weight_view(c_fc).data_ptr() == c_fc.weight.data_ptr()
    peft = _lora(make_tiny("llama"))
    assert unwrap(peft) is peft.get_base_model() and unwrap(unwrap(peft)) is unwrap(peft)
    up = unwrap(peft).model.layers[0].mlp.up_proj
    assert base_module(up) is up.base_layer and base_module(up.base_layer) is up.base_layer


# -- the registry declares kinds once ----------------------------------------------------------

def test_listed_methods_take_their_kind_from_the_registry():
    for name, info in METHODS.items():
        assert get_method(name).kind == info.kind, name

    class Contradicts(PruneMethod):
        name = "wanda"
        kind = "structured"

    with pytest.raises(ShearkitError, match="declare the kind only in `_MODULES`"):
        register_method(Contradicts)
    assert _CLASSES["wanda"] is not Contradicts

    class Unlisted(PruneMethod):
        """Test method without a kind."""

        name = "test-no-kind"
        families = ALL_FAMILIES

    with pytest.raises(ShearkitError, match="no kind"):
        register_method(Unlisted)
    assert "test-no-kind" not in METHODS


# -- the method context ------------------------------------------------------------------------

def test_work_dir_is_created_under_the_run_dir(tmp_path):
    assert MethodContext(None).work_dir("train") is None  # no run directory: a method writes nothing
    ctx = MethodContext(None, run_dir=tmp_path / "run")
    d = ctx.work_dir("train")
    assert d == tmp_path / "run" / "train" and d.is_dir()
    assert ctx.work_dir("train") == d  # a second call (e.g. on resume) finds the same folder
    for bad in ("a/b", "..", "", "/abs"):
        with pytest.raises(ShearkitError, match="plain folder name"):
            ctx.work_dir(bad)


SEEN: list[MethodContext] = []


@pytest.fixture
def context_method():
    """A structured method registered at run time that records the context it is given."""

    @register_method
    class Recorder(StructuredMethod):
        """Test method: records its context."""

        name = "test-context"
        kind = "structured"
        families = ALL_FAMILIES
        needs_calibration = True

        def dense_layers(self, num_layers):  # a rule of its own: the last layer stays dense
            return [num_layers - 1]

        def score(self, model, ctx, layers):
            SEEN.append(ctx)
            self.extra["scored_layers"] = layers
            (ctx.work_dir("scores") / "called").write_text("yes")
            return group_scores(model, layers, self.config.attn_unit, lambda m, gs: magnitude(m, gs))

    SEEN.clear()
    yield Recorder
    METHODS.pop(Recorder.name)
    _CLASSES.pop(Recorder.name)


def test_prune_hands_the_method_its_context(context_method, tiny_tokenizer, tmp_path):
    model = make_tiny("llama")
    plan = sk.prune(model, tiny_tokenizer, "test-context", 0.2, calib=CALIB, run_dir=tmp_path / "run",
                    data_dir=tmp_path, resume=True, seed=3)
    (ctx,) = SEEN
    assert ctx.calib is CALIB and ctx.tokenizer is tiny_tokenizer
    assert ctx.run_dir == tmp_path / "run" and ctx.resume and ctx.seed == 3 and ctx.data_dir == str(tmp_path)
    assert (tmp_path / "run" / "scores" / "called").read_text() == "yes"
    assert plan.method == "test-context" and plan.ratio_achieved >= 0.2
    assert plan.extra["scored_layers"] == [0, 1] and plan.extra["dense_layers"] == [2] and "2" not in plan.layers
    with pytest.raises(ShearkitError, match="resume=True needs run_dir"):
        sk.prune(make_tiny("llama"), tiny_tokenizer, "test-context", 0.2, calib=CALIB, resume=True)


def test_the_pipeline_passes_its_run_directory(context_method, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from shearkit.cli import app

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["prune", str(tiny_model_dir), "--method", "test-context", "--ratio", "0.2",
                                 "--calib", str(text), "--calib-samples", "2", "--calib-seqlen", "16",
                                 "--no-dense-eval", "--dry-run", "--out", str(out)])
    assert r.exit_code == 0, r.output
    (ctx,) = SEEN
    assert ctx.run_dir == out and ctx.calib.shape == (2, 16)
    assert (out / "scores" / "called").is_file() and (out / "plan.json").is_file()


def test_context_builds_the_shared_trainer(tiny_tokenizer, text_file, tmp_path):
    loop = pytest.importorskip("shearkit.recovery.loop")
    from peft import get_peft_model

    from shearkit.recovery import RecoverConfig
    from shearkit.recovery.lora import lora_config

    cfg = RecoverConfig(data=str(text_file), steps=2, batch_size=2, seqlen=16, warmup=0, dropout=0.0)
    base = make_tiny("llama")
    model = get_peft_model(base, lora_config(base, cfg.rank, cfg.alpha, cfg.dropout))
    ctx = MethodContext(tiny_tokenizer, run_dir=tmp_path / "run")
    trainer = ctx.trainer(model, cfg, name="prune-train")
    assert isinstance(trainer, loop.Trainer)
    history = trainer.fit(resume=ctx.resume)
    assert trainer.step == 2 and history
    assert (tmp_path / "run" / "prune-train" / "train_log.jsonl").is_file()


# -- the structured base: unchanged scores and plans -------------------------------------------

def _old_llm_pruner(model, cfg):
    """LLM-Pruner's scoring loop as it was written inside its `run` before the structured base."""
    stats = collect_stats(model, CALIB[: cfg.max_calib], grads=True, batch_size=cfg.batch_size)
    L = get_adapter(model).num_layers
    dense = end_layers(L, cfg.dense_first, cfg.dense_last, default="llm-pruner")
    return dense, {(kind, i): taylor(model, gs, stats, variant=cfg.taylor, aggregation=cfg.aggregation)
                   for i in range(L) if i not in dense for kind, gs in layer_groups(model, i, cfg.attn_unit).items()}


def _old_magnitude(model, cfg):
    L = get_adapter(model).num_layers
    dense = end_layers(L, cfg.dense_first, cfg.dense_last)
    return dense, {(kind, i): magnitude(model, gs, p=cfg.norm, aggregation=cfg.aggregation)
                   for i in range(L) if i not in dense for kind, gs in layer_groups(model, i, cfg.attn_unit).items()}


@pytest.mark.parametrize("method,family,options", [
    ("llm-pruner", "llama", {"dense_first": 1}),
    ("llm-pruner", "gpt2", {"allocation": "uniform", "taylor": "vector", "aggregation": "max"}),
    ("structured-magnitude", "qwen2", {"allocation": "global", "attn_unit": "query_heads"}),
    ("structured-magnitude", "opt", {"dense_last": 1, "norm": 1}),
])
def test_structured_scores_and_plans_match_the_old_loops(method, family, options, tiny_tokenizer):
    cfg = method_config({"method": method, "ratio": 0.3, **options})
    old = _old_llm_pruner if method == "llm-pruner" else _old_magnitude
    dense, want = old(make_tiny(family), cfg)
    impl = get_method(method)(cfg)
    ctx = MethodContext(tiny_tokenizer, calib=CALIB)
    got = impl.score(make_tiny(family), ctx, [i for i in range(get_adapter(make_tiny(family)).num_layers)
                                              if i not in dense])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ref = make_tiny(family)
    want_plan = plan_structured(ref, want, ratio=cfg.ratio, allocation=cfg.allocation, attn_unit=cfg.attn_unit,
                                round_to=cfg.round_to, dense=dense, method=method, config=cfg.to_dict())
    plan = sk.prune(make_tiny(family), tiny_tokenizer, cfg, calib=CALIB, dry_run=True)
    assert plan.layers == want_plan.layers and plan.ratio_achieved == want_plan.ratio_achieved
    assert plan.extra["dense_layers"] == dense


# -- allocation from a file of per-layer ratios ------------------------------------------------

def _ratios_file(tmp_path, ratios, name="ratios.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps({"layer_ratios": ratios}))
    return str(p)


def _mlp_removed(model_before, model_after) -> list[int]:
    return [a["mlp"] - b["mlp"] for a, b in zip(layer_geometry(model_before), layer_geometry(model_after))]


def test_file_allocation_follows_the_ratios(tmp_path):
    dense = make_tiny("llama")
    model = make_tiny("llama")
    path = _ratios_file(tmp_path, [0, 1, 3])
    plan = sk.prune(model, None, "structured-magnitude", 0.15, allocation=path, attn_unit="none", round_to=1)
    removed = _mlp_removed(dense, model)
    assert removed[0] == 0 and "0" not in plan.layers and 0 in plan.extra["dense_layers"]  # ratio 0: dense
    assert 0 < removed[1] < removed[2]  # the higher ratio loses more
    assert plan.extra["layer_ratios"] == [0.0, 1.0, 3.0]  # recorded: the plan stands without the file
    plan.save(tmp_path / "plan.json")
    assert sk.Plan.load(tmp_path / "plan.json").extra["layer_ratios"] == [0.0, 1.0, 3.0]
    c = plan.extra["layer_ratio_scale"]
    width = layer_geometry(dense)[1]["mlp"]
    for i, r in ((1, 1.0), (2, 3.0)):  # each layer loses its share c * r_i of its width, to the channel
        assert abs(removed[i] - min(1.0, c * r) * width) <= 0.5 + 1e-9
    # the target is reached, and overshot by less than one unit (an MLP channel) per prunable layer
    before = base_block_params(dense)
    got = 1 - base_block_params(model) / before
    unit = max(int(mlp_channels(dense, i).param_counts(dense).max()) for i in (1, 2))
    assert plan.ratio_achieved == pytest.approx(got, abs=1e-12)
    assert 0.15 <= got < 0.15 + 2 * unit / before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_file_allocation_reaches_the_target_within_one_unit_per_layer(family, tmp_path):
    dense = make_tiny(family)
    model = make_tiny(family)
    path = _ratios_file(tmp_path, [1, 2, 2])
    plan = sk.prune(model, None, "structured-magnitude", 0.25, allocation=path, round_to=1)
    before = base_block_params(dense)
    got = 1 - base_block_params(model) / before
    L = get_adapter(dense).num_layers
    unit = max(max(int(mlp_channels(dense, i).param_counts(dense).max()),
                   int(kv_groups(dense, i).param_counts(dense).max())) for i in range(L))
    assert 0.25 <= got < 0.25 + 2 * L * unit / before  # an MLP and an attention sequence per layer
    removed = _mlp_removed(dense, model)
    assert removed[0] < removed[1] and removed[0] < removed[2]
    assert plan.config["allocation"] == path


def test_uniform_ratios_from_a_file_equal_uniform_allocation(tmp_path):
    path = _ratios_file(tmp_path, [2, 2, 2])  # relative: only the proportions count
    a = sk.prune(make_tiny("llama"), None, "structured-magnitude", 0.3, allocation=path, dry_run=True)
    b = sk.prune(make_tiny("llama"), None, "structured-magnitude", 0.3, allocation="uniform", dry_run=True)
    assert a.layers == b.layers and a.ratio_achieved == b.ratio_achieved


@pytest.mark.parametrize("content,match", [
    (None, "neither a known allocation nor an existing file"),
    ("{not json", "is not readable JSON"),
    (json.dumps({"ratios": [1, 1, 1]}), 'no "layer_ratios" list'),
    (json.dumps({"layer_ratios": [1, -1, 1]}), 'no "layer_ratios" list'),
    (json.dumps({"layer_ratios": [1, "x", 1]}), 'no "layer_ratios" list'),
    (json.dumps([1, 1, 1]), 'no "layer_ratios" list'),
    (json.dumps({"layer_ratios": [0, 0, 0]}), "every layer ratio is 0"),
])
def test_bad_ratio_files_are_refused_by_name(content, match, tmp_path):
    p = tmp_path / "my_ratios.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ShearkitError, match=match) as e:
        method_config({"method": "llm-pruner", "allocation": str(p)})
    assert str(p) in str(e.value)


def test_a_ratio_file_for_another_depth_is_refused_by_name(tmp_path):
    path = _ratios_file(tmp_path, [1, 1, 1, 1], name="four_layers.json")
    with pytest.raises(ShearkitError, match=r"four_layers\.json gives 4 layer ratios, but the model has 3"):
        sk.prune(make_tiny("llama"), None, "structured-magnitude", 0.2, allocation=path)
