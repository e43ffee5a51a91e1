"""Every registered method x every model family, driven from the method registry.

Each case either prunes a tiny random model and checks that the target is reached (exact
sparsity for unstructured methods; for structured ones a parameter ratio at or above the
target by no more than the planner's stated tolerance; for block methods round(target x
blocks) whole blocks gone, the others' parameters all kept), that the model still runs (and decodes
with its KV cache as it computes without), and that
it saves and reloads (with `shearkit.load`, and with plain transformers where the layout is
plain or through its own modeling file) to the very same logits; or, where the method does
not declare the family, that `shearkit.prune` refuses it by name and leaves the model as it was.
A method added to the registry joins the matrix without editing this file.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import shearkit
from shearkit.arch import get_adapter, supported_families
from shearkit.errors import ShearkitError
from shearkit.graph.groups import base_block_params, kv_groups, mlp_channels, query_heads
from shearkit.methods import ALL_FAMILIES, METHODS, PruneConfig, PruneMethod, _CLASSES, register_method
from shearkit.sparsity.layers import block_linears

from conftest import FAMILIES, VOCAB, make_tiny

# the target each kind of method is asked for: every tiny layer has an even number of weights,
# so an unstructured 50% is an integer count per layer and per block; a third of the blocks is
# one block of the tiny models (3 blocks, 2 for llama_tied)
TARGETS = {"structured": 0.25, "unstructured": 0.5, "blocks": 1 / 3}
CALIB = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def _linear_zeros(model) -> tuple[int, int]:
    zeros = total = 0
    for view in get_adapter(model).blocks():
        for ref in block_linears(view).values():
            zeros += int((ref.weight == 0).sum())
            total += ref.weight.numel()
    return zeros, total


def _largest_unit(model, cfg: dict) -> int:
    """Parameters of the largest unit the structured planner can take from one layer: an MLP
    chunk (at most 2 * round_to - 1 channels, the first chunk absorbing the remainder) or an
    attention unit (a KV group, or one query head per KV head)."""
    ad = get_adapter(model)
    biggest = 0
    for i in range(ad.num_layers):
        biggest = max(biggest, int(mlp_channels(model, i).param_counts(model).max()) * (2 * cfg["round_to"] - 1))
        if cfg["attn_unit"] == "kv_group":
            biggest = max(biggest, int(kv_groups(model, i).param_counts(model).max()))
        elif cfg["attn_unit"] == "query_heads":
            per_head = int(query_heads(model, i).param_counts(model).max())
            biggest = max(biggest, per_head * ad.block_view(i).attn.num_kv_heads)
    return biggest


def _check_target(kind: str, plan, dense, model) -> None:
    target = TARGETS[kind]
    assert plan.ratio_target == pytest.approx(target)
    if kind == "unstructured":
        zeros, total = _linear_zeros(model)
        assert zeros == round(target * total)  # the target exactly, counted from the weights
        assert plan.ratio_achieved == pytest.approx(zeros / total, abs=1e-12)
        assert base_block_params(model) == base_block_params(dense)  # nothing removed, only zeroed
        return
    before, after = base_block_params(dense), base_block_params(model)
    removed = 1 - after / before
    assert plan.ratio_achieved == pytest.approx(removed, abs=1e-12)  # reported = counted from the shapes
    if kind == "blocks" and plan.replaced:  # replaced by shared copies: same depth, fewer stored parameters
        from shearkit.surgery.shared_block import shared_parameters

        n = get_adapter(dense).num_layers
        assert len(plan.replaced) == int(target * n + 0.5) and not plan.blocks
        assert get_adapter(model).num_layers == model.config.num_hidden_layers == n
        sizes = [sum(p.numel() for p in get_adapter(dense).layers[i].parameters()) for i in range(n)]
        norms = sum(p.numel() for i in map(int, plan.replaced) for nm in get_adapter(dense).block_view(i).norms
                    for p in nm.parameters())  # a replaced block keeps its own input norms
        own = sum(p.numel() for p in shared_parameters(model).values())  # adapters and output norms
        assert after == before - sum(sizes[int(i)] for i in plan.replaced) + own + norms
        return
    if kind == "blocks":  # whole blocks: round(target x blocks) of them, the rest untouched
        n = get_adapter(dense).num_layers
        k = int(target * n + 0.5)
        assert len(plan.blocks) == k and get_adapter(model).num_layers == model.config.num_hidden_layers == n - k
        kept = [i for i in range(n) if i not in plan.blocks]
        sizes = [sum(p.numel() for p in get_adapter(dense).layers[i].parameters()) for i in range(n)]
        assert after == sum(sizes[i] for i in kept)
        return
    # the planner's stated tolerance: under one unit (global allocation), one unit per unit
    # sequence (an MLP and an attention sequence per prunable layer) with uniform allocation
    cfg = plan.config
    prunable = get_adapter(dense).num_layers - len(plan.extra.get("dense_layers", []))
    seqs = 1 if cfg["allocation"] == "global" else prunable * (1 if cfg["attn_unit"] == "none" else 2)
    tolerance = seqs * _largest_unit(dense, cfg) / before
    assert target <= removed < target + tolerance, (removed, target, tolerance)


def _greedy(model) -> list[int]:
    """Six greedy tokens decoded with the KV cache, checked against full forwards without it."""
    with torch.no_grad():
        out = model.generate(PROBE[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        full = model(input_ids=out, use_cache=False).logits[0, PROBE.shape[1] - 1:-1].argmax(-1)
    new = out[0, PROBE.shape[1]:].tolist()
    assert new == full.tolist()  # cached decoding agrees with the uncached model
    return new


def _check_reload(tmp_path, model, tok, plan, want: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    out = shearkit.save(model, tok, tmp_path / "model", plan=plan)
    loaded, _ = shearkit.load(out, device="cpu", dtype="float32")
    torch.testing.assert_close(_logits(loaded), want, atol=1e-5, rtol=0)
    assert _greedy(loaded) == _greedy(model)
    config = json.loads((out / "config.json").read_text())
    plain = "auto_map" not in config
    other = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=not plain).eval()
    torch.testing.assert_close(_logits(other), want, atol=1e-5, rtol=0)
    if plain:  # a plain layout must be the family's own class, nothing of shearkit's
        assert type(other).__module__.startswith("transformers.models.")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_family(method, family, tmp_path, tiny_tokenizer, request):
    info = METHODS[method]
    dense = make_tiny(family)
    model = copy.deepcopy(dense)
    fam = get_adapter(model).family
    if fam not in info.families:
        with pytest.raises(ShearkitError, match=f"supports: {', '.join(info.families)}"):
            shearkit.prune(model, tiny_tokenizer, method, TARGETS.get(info.kind, 0.5), calib=CALIB)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))
        return
    assert info.kind in TARGETS, f"the matrix has no target for methods of kind '{info.kind}': add one"
    smoke = shearkit.methods.get_method(method).smoke_options
    data = request.getfixturevalue("data_dir") if "train" in smoke else None  # trains on the real data
    plan = shearkit.prune(model, tiny_tokenizer, method, TARGETS[info.kind], calib=CALIB, data_dir=data, **smoke)
    assert plan.method == method and plan.kind == info.kind
    _check_target(info.kind, plan, dense, model)
    logits = _logits(model)
    assert logits.shape == (*PROBE.shape, VOCAB) and torch.isfinite(logits).all()
    assert not torch.equal(logits, _logits(dense))  # pruning changed the model
    _check_reload(tmp_path, model, tiny_tokenizer, plan, logits)


def test_registry_families_are_the_adapters_families():
    """A family the adapters gain must be decided for every method, and no method may name a
    family that does not exist; the matrix's families cover every adapter family."""
    assert set(ALL_FAMILIES) == set(supported_families())
    for info in METHODS.values():
        assert info.families and set(info.families) <= set(ALL_FAMILIES), info.name
    assert {get_adapter(make_tiny(f)).family for f in FAMILIES} == set(ALL_FAMILIES)


@pytest.fixture
def opt_only_method():
    """A method registered at run time that supports only the OPT family."""

    @register_method
    class OptOnly(PruneMethod):
        """Test method: OPT only."""

        name = "test-opt-only"
        kind = "structured"
        families = ("opt",)
        needs_calibration = True

        def run(self, model, ctx):  # pragma: no cover - must never be reached
            raise AssertionError("ran on an unsupported family")

    yield OptOnly
    METHODS.pop(OptOnly.name)
    _CLASSES.pop(OptOnly.name)


def test_unsupported_family_is_refused_before_calibration(opt_only_method):
    model = make_tiny("llama")
    before = copy.deepcopy(model.state_dict())
    # calib=None would make prune read the default calibration set: the refusal comes first
    with pytest.raises(ShearkitError, match=r"'test-opt-only' does not support the llama family .*supports: opt"):
        shearkit.prune(model, None, "test-opt-only", 0.2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert METHODS["test-opt-only"].families == ("opt",)


def test_a_method_without_families_cannot_register():
    class Undeclared(PruneMethod):
        """Test method without families."""

        name = "test-undeclared"
        kind = "structured"
        config_cls = PruneConfig

    with pytest.raises(ShearkitError, match="declares no model families"):
        register_method(Undeclared)
    assert "test-undeclared" not in METHODS and "test-undeclared" not in _CLASSES


def test_the_command_line_refuses_before_reading_calibration(opt_only_method, tiny_model_dir, tmp_path,
                                                             monkeypatch):
    """`shearkit prune` says the family is unsupported before it reads calibration data (that the
    named files exist is checked even earlier, before any model loads)."""
    from typer.testing import CliRunner

    import shearkit.pruning
    from shearkit.cli import app

    def no_calibration(*a, **k):
        raise AssertionError("calibration data was read before the family check")

    monkeypatch.setattr(shearkit.pruning, "calib_tokens", no_calibration)
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    r = CliRunner().invoke(app, ["prune", str(tiny_model_dir), "--method", "test-opt-only", "--ratio", "0.2",
                                 "--calib", str(text), "--tasks", str(text), "--no-dense-eval",
                                 "--out", str(tmp_path / "run")])
    assert isinstance(r.exception, ShearkitError), r.output
    assert "does not support the llama family" in str(r.exception) and "supports: opt" in str(r.exception)
