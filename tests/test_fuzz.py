"""Fuzzing the readers of user input: no recipe, plan, data file or model config may end in anything
but success or a `ShearkitError` (issue 15, item 5).

Each test draws both structurally plausible inputs (the right keys with wrong types or values:
negative, NaN, huge, nested, strings for numbers, unknown keys, missing fields, bad JSON lines,
bytes that are not UTF-8) and raw garbage, hands them to a reader, and fails on any other
exception. The readers: recipes (`parse_recipe`, `load_recipe`, `--set`), plans (`Plan.load` with its
masks file, `Plan.from_dict`), data files (`load_rows`, `load_instructions`, `recover --data`,
`--calib`) and model folders (`shearkit.load` of a config.json and weights index; the zero-shot
task files are read by lm-evaluation-harness, not by shearkit). Every crash the fuzzing found is pinned by an `@example` on the test that found it
(its reason starts with "regression:").

The number of examples per test comes from $SHEARKIT_FUZZ_EXAMPLES (default 40) under the
hypothesis profile "fuzz-ci": derandomized, so a CI run is reproducible. A larger count selects
the profile "fuzz-long" (random, a fresh search each run), the long run kept as a benchmark:

    SHEARKIT_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py -p no:cacheprovider

($SHEARKIT_FUZZ_PROFILE=fuzz-ci|fuzz-long picks the profile explicitly; SHEARKIT_FUZZ_EXAMPLES=0 runs
only the explicit examples.) A failure prints the example that caused it: fix the reader (a
ShearkitError that says which file or key and what it expects), then pin the example here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

from shearkit.errors import ShearkitError

CI_EXAMPLES = 40
EXAMPLES = int(os.environ.get("SHEARKIT_FUZZ_EXAMPLES", CI_EXAMPLES))
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                      HealthCheck.function_scoped_fixture])
if EXAMPLES < 1:  # 0: only the regression examples
    _COMMON["phases"] = (Phase.explicit,)
settings.register_profile("fuzz-ci", max_examples=max(EXAMPLES, 1), derandomize=True, **_COMMON)
settings.register_profile("fuzz-long", max_examples=max(EXAMPLES, 1), derandomize=False, **_COMMON)
PROFILE = os.environ.get("SHEARKIT_FUZZ_PROFILE") or ("fuzz-long" if EXAMPLES > 200 else "fuzz-ci")
fuzz = settings(settings.get_profile(PROFILE))  # applied per test: other test modules keep their settings


# -- strategies ---------------------------------------------------------------------------------

odd_text = st.sampled_from(["", " ", "nan", "NaN", "inf", "-1", "0", "1e999", "0.5", "2:4", "a:b", "true", "null",
                            "~", "../../etc", "/abs/path", "x" * 300, "\x00", "é", "{", "[1, 2"])
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-3, max_value=3), st.integers(), st.integers(min_value=2**62, max_value=2**1100),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 1e300]),
    st.text(max_size=12), odd_text,
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
garbage_bytes = st.one_of(st.binary(max_size=300), st.sampled_from([b"", b"\xff\xfe\x00", b"\x80abc", b"\xc3\x28"]))


def keyed(names: list[str], value=values, unknown: bool = True) -> st.SearchStrategy[dict]:
    """Mappings over `names` (some left out) and, now and then, a key that is not one of them (or not a string)."""
    keys = st.sampled_from(names)
    if unknown:
        keys = keys | st.text(max_size=8) | st.none() | st.integers(-1, 2)
    return st.dictionaries(keys, value, max_size=min(6, len(names) + 1))


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def recipe_sections() -> dict[str, list[str]]:
    """Each recipe section's valid keys (the prune section: the union over the methods)."""
    from shearkit.extension import ExtendConfig
    from shearkit.methods import METHODS, get_method
    from shearkit.recipe import STATIC_SECTIONS
    from shearkit.recovery import RecoverConfig

    prune = sorted({f for m in METHODS for f in _fields(get_method(m).config_cls)} | {"sparsity"})
    return {**{k: _fields(v) for k, v in STATIC_SECTIONS.items()}, "prune": prune,
            "recover": _fields(RecoverConfig), "extend": _fields(ExtendConfig)}


@st.composite
def recipe_dicts(draw) -> dict:
    """A recipe mapping: real sections and keys with values drawn from `values` (or near-valid ones)."""
    from shearkit.methods import METHODS
    from shearkit.recipe import TOP_LEVEL_KEYS
    from shearkit.recovery import RecoverConfig

    sections = recipe_sections()
    nested = keyed(_fields(RecoverConfig))
    out: dict = {}
    for name in draw(st.lists(st.sampled_from([*sections, *TOP_LEVEL_KEYS, "prnue"]), max_size=4, unique=True)):
        if name in TOP_LEVEL_KEYS or name not in sections:
            out[name] = draw(values)
            continue
        if draw(st.integers(0, 9)) == 0:  # a section that is not a mapping
            out[name] = draw(values)
            continue
        sec = draw(keyed(sections[name]))
        if name == "prune" and draw(st.booleans()):
            sec["method"] = draw(st.sampled_from(sorted(METHODS)))
        for k in ("train", "recovery", "dynamic"):
            if k in sec and draw(st.booleans()):
                sec[k] = draw(nested)
        out[name] = sec
    return out


@st.composite
def near_valid_recipes(draw) -> dict:
    """A valid recipe with one or two keys set to a drawn value: the value meets the checks of its key
    rather than failing on another key first."""
    from shearkit.methods import METHODS

    sections = recipe_sections()
    valid = {"model": {}, "calib": {}, "eval": {}, "recover": {}, "extend": {"add_blocks": 1},
             "prune": {"method": draw(st.sampled_from(sorted(METHODS))), "ratio": 0.25}}
    out = {k: valid[k] for k in draw(st.lists(st.sampled_from(sorted(valid)), min_size=1, max_size=3, unique=True))}
    for _ in range(draw(st.integers(1, 2))):
        section = draw(st.sampled_from(sorted(out)))
        key = draw(st.sampled_from(sections[section]))
        out[section] = {**out[section], key: draw(values)}
    return out


yaml_recipes = recipe_dicts().map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode("utf-8"))
recipe_files = st.one_of(yaml_recipes, garbage_bytes, st.text(max_size=200).map(str.encode),
                         st.sampled_from([b"model: {name: [", b"- a\n- b\n", b"? [a, b]\n: c\n",
                                          b"calib: !!python/object:os.system {}",
                                          b"model:\n  name: &a [*a]\n", b"eval: {tasks: [], seqlen: 1e400}"]))

PLAN_FIELDS = ["method", "kind", "ratio_target", "ratio_achieved", "base", "config", "layers", "blocks", "replaced",
               "hidden_channels", "extra", "schema_version", "shearkit_version", "created", "masks_file"]
plan_values = {
    "method": st.sampled_from(["wanda", "llm-pruner"]) | values,
    "kind": st.sampled_from(["structured", "unstructured", "blocks"]) | values,
    "ratio_target": st.floats(0, 1) | values,
    "layers": st.dictionaries(st.sampled_from(["0", "1", "-1", "x"]) | st.text(max_size=3),
                              keyed(["heads", "kv_groups", "mlp_channels", "sparsity", "pattern"]) | values,
                              max_size=3) | values,
    "blocks": st.lists(st.integers(-2, 5)) | values,
    "schema_version": st.sampled_from([1, 2, 3]) | values,
    "masks_file": st.sampled_from(["masks.safetensors", "../x", "/etc/hostname", ""]) | values,
}


@st.composite
def plan_dicts(draw) -> dict:
    """A plan record: the required fields present (mostly), each value plausible or wrong."""
    keys = draw(st.lists(st.sampled_from(PLAN_FIELDS), max_size=8, unique=True))
    keys = list(dict.fromkeys(["method", "kind", "ratio_target", *keys])) if draw(st.booleans()) else keys
    d = {k: draw(plan_values.get(k, values)) for k in keys}
    if draw(st.integers(0, 9)) == 0:
        d[draw(st.text(max_size=6))] = draw(values)
    return d


plan_files = st.one_of(plan_dicts().map(lambda d: json.dumps(d).encode()), values.map(lambda v: json.dumps(v).encode()),
                       garbage_bytes)

record_keys = ["text", "sentence", "content", "instruction", "input", "output", "history"]
instruction_records = st.fixed_dictionaries(
    {"instruction": st.text(max_size=20), "output": st.text(max_size=20)},
    optional={"input": st.text(max_size=10) | values,
              "history": st.lists(st.lists(st.text(max_size=8), min_size=2, max_size=2) | values, max_size=2) | values})
records = st.one_of(keyed(record_keys, st.text(max_size=20) | values), instruction_records, st.text(max_size=20),
                    values)


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    """(suffix, contents) of a data file: text, json (a list of records or anything), jsonl or garbage."""
    suffix = draw(st.sampled_from([".txt", ".json", ".jsonl"]))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return suffix, draw(garbage_bytes)
    if kind == 1:
        return suffix, draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == 2:  # well-formed records of one kind, as a real file holds
        recs = draw(st.lists(draw(st.sampled_from([instruction_records, st.fixed_dictionaries(
            {"text": st.text(max_size=40)})])), max_size=5))
    else:
        recs = draw(st.lists(records, max_size=5) | values)
    if suffix == ".jsonl":
        lines = [json.dumps(r) for r in (recs if isinstance(recs, list) else [recs])]
        if kind == 3:
            lines += draw(st.lists(st.sampled_from(["", "{", "[1,", "nul", "{}"]), max_size=2))
        return suffix, "\n".join(draw(st.permutations(lines))).encode()
    return suffix, json.dumps(recs).encode()


def _write(folder: str, name: str, data: bytes) -> Path:
    p = Path(folder) / name
    p.write_bytes(data)
    return p


def _reads(fn, *args, **kwargs):
    """Run a reader: success, or a ShearkitError whose message is one clear sentence or more (never empty)."""
    try:
        out = fn(*args, **kwargs)
    except ShearkitError as e:
        assert str(e).strip(), "a ShearkitError with no message"
        event("refused")  # --hypothesis-show-statistics shows how many inputs got how far
        return None
    event("read")
    return out


# -- recipes ------------------------------------------------------------------------------------

@fuzz
@given(recipe_dicts() | near_valid_recipes())
@example({"prune": {"method": [None], "ratio": 0.25}}).via(
    "regression: a list as prune.method (TypeError: unhashable)")
@example({"prune": {"method": 1}}).via("regression: a number as prune.method (TypeError in the suggestion)")
@example({"eval": {1: 2}}).via("regression: a number as a key (TypeError in the suggestion)")
@example({"recover": {"alpha": math.nan}}).via("regression: NaN passed every range check (recipe not reproducible)")
@example({"recover": {"lr": 2**1100}}).via("regression: an int too large for a float key (OverflowError)")
@example({"out": "\x00"}).via("regression: a NUL in out (ValueError resolving the path)")
def test_parse_recipe_mapping(data):
    from shearkit.recipe import parse_recipe

    recipe = _reads(parse_recipe, data)
    if recipe is not None:  # what `run` does next with it: the run directory, seeds, the resolved YAML
        _reads(recipe.out_dir, None)
        recipe.seeds()
        assert parse_recipe(yaml.safe_load(recipe.to_yaml())).to_dict() == recipe.to_dict()


@fuzz
@given(recipe_files)
@example(b"\x80").via("regression: a recipe that is not UTF-8 (UnicodeDecodeError)")
@example(b"?").via("regression: a key that is null, not a name (TypeError in the suggestion)")
@example(b"[" * 3000).via("regression: YAML nested too deeply (RecursionError)")
def test_load_recipe_file(contents):
    from shearkit.recipe import load_recipe

    with tempfile.TemporaryDirectory() as d:
        _reads(load_recipe, _write(d, "recipe.yaml", contents))


@fuzz
@given(st.lists(st.text(max_size=30) | st.sampled_from(["eval.seqlen=", "calib.samples=1e999", "model.x.y=1",
                                                         "prune.method=wanda", "eval.tasks=[a", "a.b.c.d=[]"]),
                max_size=3))
@example(["eval.tasks=[a"]).via("regression: --set with a value that is not YAML (ParserError)")
@example([".=\t"]).via("regression: --set with a tab for a value (ScannerError)")
def test_recipe_overrides(overrides):
    from shearkit.recipe import parse_recipe

    _reads(parse_recipe, {"eval": {"seqlen": 8}}, overrides)


# -- plans --------------------------------------------------------------------------------------

@fuzz
@given(plan_files)
@example(b"\x80").via("regression: plan.json that is not UTF-8 (UnicodeDecodeError)")
@example(b"null").via("regression: plan.json holding null (AttributeError)")
@example(b"{}").via("regression: plan.json without method, kind, ratio_target (TypeError)")
@example(b"[" * 3000).via("regression: JSON nested too deeply (RecursionError)")
@example(b'{"method": "m", "kind": "structured", "ratio_target": 0.1, "layers": {"x": {}}}').via(
    "regression: a layer key that is not an index (ValueError in summary_rows)")
@example(b'{"method": "m", "kind": "structured", "ratio_target": 0.1, "layers": {"0": [1]}}').via(
    "regression: a layer entry that is not an object (AttributeError in summary_rows)")
@example(b'{"method": "m", "kind": "unstructured", "ratio_target": 0.1, "masks_file": 3}').via(
    "regression: a masks_file that is not a name (TypeError)")
def test_load_plan_file(contents):
    from shearkit.plan import Plan

    with tempfile.TemporaryDirectory() as d:
        plan = _reads(Plan.load, _write(d, "plan.json", contents))
        if plan is not None:  # what `shearkit show` does with it
            plan.summary_rows()
            json.dumps(plan.to_dict())


@fuzz
@given(plan_dicts())
@example({"method": "m", "kind": "blocks", "ratio_target": 0.5, "schema_version": "3"}).via(
    "regression: a string schema_version (TypeError comparing it)")
@example({"method": "m", "kind": "blocks", "ratio_target": 2**1100}).via(
    "regression: an int too large for a float (OverflowError in the finite check)")
def test_plan_from_dict(d):
    from shearkit.plan import Plan

    _reads(Plan.from_dict, d)


mask_shapes = st.one_of(
    st.dictionaries(st.sampled_from(["w", "v"]), st.lists(st.integers(-1, 20), max_size=3) | values, max_size=2)
    .map(json.dumps),
    garbage_bytes.map(lambda b: b.decode("utf-8", "replace")))


@fuzz
@given(garbage_bytes, mask_shapes, st.booleans())
@example(b"", "", True).via("regression: masks.safetensors whose shapes record is empty (JSONDecodeError)")
@example(b"", '{"w": "ab"}', True).via("regression: a shape that is not a list (ValueError on access)")
@example(b"", '{"w": [2, 5]}', True).via("a mask file that reads")
def test_plan_masks_file(contents, shapes, safetensors):
    """An unstructured plan whose masks file is garbage, or a mask file whose shapes record is odd."""
    import torch
    from safetensors.torch import save_file

    from shearkit.plan import Plan

    with tempfile.TemporaryDirectory() as d:
        _write(d, "plan.json", json.dumps({"method": "wanda", "kind": "unstructured", "ratio_target": 0.5}).encode())
        if safetensors:
            meta = {"format": "shearkit-packed-masks", "shapes": shapes}
            save_file({"w": torch.zeros(2, 1, dtype=torch.uint8)}, str(Path(d) / "masks.safetensors"), metadata=meta)
        else:
            _write(d, "masks.safetensors", contents)
        plan = _reads(Plan.load, Path(d) / "plan.json")
        if plan is not None and plan.masks is not None:  # the masks unpack as they are used
            for name in plan.masks:
                plan.masks[name]


# -- data files ---------------------------------------------------------------------------------

@fuzz
@given(data_files())
@example((".txt", b"\x80")).via("regression: a text file that is not UTF-8 (UnicodeDecodeError)")
@example((".jsonl", b"0")).via("regression: a jsonl record that is a number (TypeError)")
@example((".jsonl", b"{")).via("regression: a jsonl line that is not JSON (JSONDecodeError)")
@example((".json", b"")).via("regression: an empty .json file (JSONDecodeError)")
@example((".json", b"0")).via("regression: a .json file holding a number (TypeError: not iterable)")
@example((".jsonl", b'{"text": 1}')).via("regression: a text field that is not a string (TypeError joining rows)")
@example((".json", b"[" * 3000)).via("regression: JSON nested too deeply (RecursionError)")
def test_load_rows_file(file):
    from shearkit.data import load_rows

    suffix, contents = file
    with tempfile.TemporaryDirectory() as d:
        rows = _reads(load_rows, str(_write(d, "data" + suffix, contents)))
        if rows is not None:
            assert all(isinstance(r, str) for r in rows.rows) and isinstance(rows.text, str)


@fuzz
@given(data_files())
@example((".json", b"\xff")).via("regression: an instruction file that is not UTF-8 (UnicodeDecodeError)")
@example((".json", b"0")).via("regression: a .json file holding a number (TypeError: not iterable)")
def test_load_instructions_file(file):
    from shearkit.data import load_instructions

    suffix, contents = file
    with tempfile.TemporaryDirectory() as d:
        _reads(load_instructions, str(_write(d, "data" + suffix, contents)))


@fuzz
@given(data_files())
@example(file=(".json", b"\x80")).via(
    "regression: guessing the mode of a file that is not UTF-8 (UnicodeDecodeError)")
@example(file=(".json", b'[{"instruction": 1, "output": "x"}]')).via(
    "regression: a number as instruction (TypeError)")
@example(file=(".json", b'[{"instruction": "a", "output": null}]')).via(
    "regression: a null output (ValueError in the tokenizer)")
def test_recover_data_file(tiny_tokenizer, file):
    """`recover --data FILE`: the mode is guessed from the file, then its examples tokenised."""
    from shearkit.recovery.data import build_train_data

    suffix, contents = file
    with tempfile.TemporaryDirectory() as d:
        _reads(build_train_data, tiny_tokenizer, str(_write(d, "data" + suffix, contents)), seqlen=8)


@fuzz
@given(data_files())
def test_calib_file(tiny_tokenizer, file):
    """`--calib FILE`: calibration windows cut from a user's file."""
    from shearkit.data.calib import calibration_windows

    suffix, contents = file
    with tempfile.TemporaryDirectory() as d:
        _reads(calibration_windows, tiny_tokenizer, str(_write(d, "calib" + suffix, contents)), n=1, seqlen=2)


# -- model directories: config.json ---------------------------------------------------------------
# A folder with the fuzzed config.json, a one-tensor model.safetensors and (mostly) a tokenizer,
# loaded for real with `shearkit.load`. Sizes stay small (a config that builds does so in
# milliseconds): a huge size is a big model, not a malformed input, and would only cost memory.

small_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 64), st.sampled_from([math.nan, math.inf, -1.5, 0.0]),
              st.text(max_size=8), odd_text.filter(lambda t: len(t) < 20)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
# every family's size keys, small, so that a changed model_type builds a small model too
SMALL_SIZES = {"vocab_size": 320, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32, "n_embd": 16,
               "n_layer": 1, "n_head": 2, "n_positions": 32, "n_inner": 32, "ffn_dim": 32, "word_embed_proj_dim": 16,
               "d_model": 16, "d_ff": 32, "d_kv": 8, "num_layers": 1, "num_heads": 2}
BASE_CONFIGS = {name: {"model_type": name, "architectures": [arch], **SMALL_SIZES}
                for name, arch in [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel"),
                                   ("opt", "OPTForCausalLM")]}
module_paths = st.sampled_from(["mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "mlp", "", "nope.x", "__class__"])
layers_paths = st.sampled_from(["model.layers", "transformer.h", "model.decoder.layers", "", "nope"]) | small_values
config_values = {
    "model_type": st.sampled_from(["llama", "gpt2", "opt", "mistral", "qwen2", "bert", "t5", "nope", ""])
    | small_values,
    "architectures": st.lists(st.sampled_from(["LlamaForCausalLM", "GPT2LMHeadModel", "BertModel", "os.system", "",
                                               "Nope"]), max_size=2) | small_values,
    "quantization_config": st.fixed_dictionaries(
        {"quant_method": st.sampled_from(["compressed-tensors", "gptq"]),
         "sparsity_config": st.fixed_dictionaries({"format": st.sampled_from(["sparse-bitmask", "dense"])
                                                   | small_values}) | small_values}) | small_values,
    "shearkit_layer_shapes": st.fixed_dictionaries(
        {"layers_path": layers_paths,
         "layers": st.lists(st.fixed_dictionaries(
             {"modules": st.dictionaries(module_paths, st.lists(st.integers(-1, 40), min_size=2, max_size=2)
                                         | small_values, max_size=2),
              "attrs": st.dictionaries(module_paths, small_values, max_size=1)}) | small_values, max_size=2)})
    | small_values,
    "shearkit_shared_blocks": st.fixed_dictionaries(
        {"layers_path": layers_paths,
         "blocks": st.dictionaries(st.sampled_from(["0", "1", "x"]), st.fixed_dictionaries(
             {"base": st.integers(-1, 2) | small_values,
              "modules": st.dictionaries(module_paths, st.fixed_dictionaries(
                  {"rank": st.integers(-1, 4) | small_values, "norm": small_values}) | small_values, max_size=2)})
             | small_values, max_size=2)}) | small_values,
}
EXTRA_CONFIG_KEYS = [*config_values, "torch_dtype", "dtype", "rope_scaling", "rope_theta", "hidden_act",
                     "tie_word_embeddings", "auto_map", "pad_token_id", "eos_token_id"]


def _cfg(**changes) -> bytes:
    """config.json of the small llama with `changes`."""
    return json.dumps({**BASE_CONFIGS["llama"], **changes}).encode()


@st.composite
def config_files(draw) -> bytes:
    """A config.json: a small config of a supported family with one to three keys changed, or garbage."""
    if draw(st.integers(0, 4)) == 0:
        return draw(garbage_bytes | small_values.map(lambda v: json.dumps(v).encode()))
    cfg = dict(BASE_CONFIGS[draw(st.sampled_from(sorted(BASE_CONFIGS)))])
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*cfg, *EXTRA_CONFIG_KEYS]) | st.text(max_size=6))
        if draw(st.integers(0, 5)) == 0 and key not in SMALL_SIZES:  # a missing size would default to a big model
            cfg.pop(key, None)
        else:
            cfg[key] = draw(config_values.get(key, small_values))
    return json.dumps(cfg).encode()


@pytest.fixture(scope="module")
def tokenizer_files(tiny_tokenizer, tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(d)
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _model_dir(folder: str, config: bytes, tokenizer_files: dict[str, bytes] | None) -> Path:
    import torch
    from safetensors.torch import save_file

    d = Path(folder)
    _write(folder, "config.json", config)
    save_file({"x": torch.zeros(1)}, str(d / "model.safetensors"))
    for name, data in (tokenizer_files or {}).items():
        _write(folder, name, data)
    return d


@fuzz
@given(config_files(), st.integers(0, 5).map(bool))  # one folder in six without a tokenizer
@example(config=_cfg(tie_word_embeddings=None), with_tokenizer=True).via(
    "regression: a mistyped key (StrictDataclassFieldValidationError from transformers)")
@example(config=_cfg(torch_dtype=[]), with_tokenizer=True).via(
    "regression: torch_dtype [] (IndexError loading the tokenizer)")
@example(config=_cfg(), with_tokenizer=False).via("regression: a model folder without a tokenizer (ValueError)")
@example(config=b"[]", with_tokenizer=True).via("regression: config.json holding a list (AttributeError)")
@example(config=_cfg(quantization_config="x"), with_tokenizer=True).via(
    "regression: a quantization_config that is not an object")
@example(config=_cfg(quantization_config={"quant_method": "compressed-tensors", "sparsity_config": "x"}),
         with_tokenizer=True).via(
    "regression: a sparsity_config that is not an object (AttributeError)")
@example(config=_cfg(shearkit_layer_shapes={"layers": []}, architectures={"a": 1}), with_tokenizer=True).via(
    "regression: architectures that is not a list (KeyError)")
@example(config=b"[" * 3000, with_tokenizer=True).via("regression: JSON nested too deeply (RecursionError)")
def test_model_config(tokenizer_files, config, with_tokenizer):
    import shearkit

    with tempfile.TemporaryDirectory() as d:
        path = _model_dir(d, config, tokenizer_files if with_tokenizer else None)
        _reads(shearkit.load, path, device="cpu", dtype="float32")


@fuzz
@given(garbage_bytes | values.map(lambda v: json.dumps({"weight_map": v}).encode()))
@example(index=b"\x80").via("regression: an index that is not UTF-8 (UnicodeDecodeError)")
@example(index=b'{"weight_map": {"a": 1}}').via("regression: a shard name that is not a string (TypeError)")
@example(index=json.dumps({"weight_map": {"a": "x" * 300}}).encode()).via(
    "regression: a shard name too long (OSError)")
def test_weights_index_file(tokenizer_files, index):
    """model.safetensors.index.json: which shards hold the weights."""
    import shearkit

    with tempfile.TemporaryDirectory() as d:
        path = _model_dir(d, json.dumps(BASE_CONFIGS["llama"]).encode(), tokenizer_files)
        _write(d, "model.safetensors.index.json", index)
        _reads(shearkit.load, path, device="cpu", dtype="float32")
