"""Recipes: YAML sections mirror config dataclasses; bad keys and values get clear errors."""
import pytest

from shearkit.errors import ShearkitError
from shearkit.recipe import load_recipe, parse_recipe


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {name: smollm2-135m}\neval: {tasks: [wikitext2, ptb], seqlen: 512}\n")
    r = load_recipe(p, overrides=["eval.limit=8", "calib.samples=16"])
    assert r.eval.tasks == ["wikitext2", "ptb"] and r.eval.seqlen == 512 and r.eval.limit == 8
    assert r.calib.samples == 16 and r.calib.dataset == "c4"
    again = parse_recipe(__import__("yaml").safe_load(r.to_yaml()))
    assert again.to_dict() == r.to_dict()


def test_cli_values_override_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("eval: {seqlen: 512}\n")
    r = load_recipe(p, extra={"eval": {"seqlen": 128, "limit": None}})
    assert r.eval.seqlen == 128 and r.eval.limit is None


def test_unknown_key_suggests_closest():
    with pytest.raises(ShearkitError, match=r"Unknown key 'eval.seqlenn'.*Did you mean 'seqlen'"):
        parse_recipe({"eval": {"seqlenn": 5}})


def test_unknown_section_suggests_closest():
    with pytest.raises(ShearkitError, match=r"Unknown recipe section 'evl'.*Did you mean 'eval'"):
        parse_recipe({"evl": {}})


def test_bad_types_name_the_key():
    with pytest.raises(ShearkitError, match="eval.seqlen must be an integer"):
        parse_recipe({"eval": {"seqlen": "long"}})
    with pytest.raises(ShearkitError, match="model.trust_remote_code must be true or false"):
        parse_recipe({"model": {"trust_remote_code": "maybe"}})
    with pytest.raises(ShearkitError, match="--limit must be a positive"):
        parse_recipe({"eval": {"limit": 0}})


def test_bad_override_syntax():
    with pytest.raises(ShearkitError, match="section.key=value"):
        parse_recipe({}, overrides=["seqlen=5"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ShearkitError, match="not found"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval: [unclosed\n")
    with pytest.raises(ShearkitError, match="not valid YAML"):
        load_recipe(bad)


def test_every_shipped_recipe_loads():
    from shearkit.recipe import BUILTIN_RECIPES, builtin_recipes

    names = builtin_recipes()
    assert "quick" in names
    for name in names:
        r = load_recipe(name)
        assert r.model.name == "smollm2-135m"
        assert r.get("prune") is not None or r.get("extend") is not None, name
        assert load_recipe(BUILTIN_RECIPES / f"{name}.yaml").to_dict() == r.to_dict()


def test_unknown_shipped_recipe_suggests():
    with pytest.raises(ShearkitError, match="Did you mean 'quick'"):
        load_recipe("quik")


def test_set_reaches_into_nested_mappings():
    """`--set prune.train.steps=4` sets a key of a mapping-valued field (LoRAPrune's `train`)."""
    from shearkit.recipe import apply_override

    data = {"prune": {"method": "loraprune", "train": {"data": "alpaca"}}}
    apply_override(data, "prune.train.steps=4")
    apply_override(data, "eval.limit=2")
    assert data == {"prune": {"method": "loraprune", "train": {"data": "alpaca", "steps": 4}}, "eval": {"limit": 2}}
    with pytest.raises(ShearkitError, match="'prune.method' is not a section or a mapping"):
        apply_override(data, "prune.method.x=1")
