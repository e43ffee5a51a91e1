"""Zero-shot tasks through lm-evaluation-harness: task resolution, prompts equal to the harness's own
tasks, and accuracies checked against an independent log-likelihood scorer on a tiny model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from shearkit.errors import ShearkitError
from shearkit.eval import zeroshot as zs

SEVEN = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]

# a few examples per task in the layouts of the data dir (docs/zeroshot.md); the HF-layout twin of
# each row is what the harness's own task would read, used to compare prompts
PIQA = [{"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Bake the lid.", "label": 0},
        {"goal": "dry wet shoes", "sol1": "put them in water", "sol2": "stuff them with paper", "label": 1},
        {"goal": "Keep bread fresh", "sol1": "Store it in a bag.", "sol2": "Leave it in the rain.", "label": 0}]
BOOLQ_HF = [{"passage": "The fox is brown. It jumps over the lazy dog.", "question": "is the fox brown", "label": 1},
            {"passage": "Pruning makes language models smaller.", "question": "does pruning make models larger",
             "label": 0},
            {"passage": "Hello world, this is a test.", "question": "is this a test", "label": 1}]
BOOLQ = [{"query": f"Passage: {d['passage']}\nQuestion: {d['question']}?", "choices": ["no", "yes"], "gold": d["label"]}
         for d in BOOLQ_HF]
WINO_HF = [{"sentence": "The fox jumped over the dog because _ was quick.", "option1": "the fox", "option2": "the dog",
            "answer": "1"},
           {"sentence": "Sarah lent Maria a pen since _ had two.", "option1": "Sarah", "option2": "Maria",
            "answer": "1"},
           {"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup",
            "option2": "the table", "answer": "2"}]


def _wino_mosaic(d):
    i = d["sentence"].index("_")
    return {"context_options": [d["sentence"][:i] + d["option1"], d["sentence"][:i] + d["option2"]],
            "continuation": d["sentence"][i + 1:].strip(), "gold": int(d["answer"]) - 1}


WINO = [_wino_mosaic(d) for d in WINO_HF]
ARC_HF = [{"question": "Which is a mammal?", "choices": {"text": ["fox", "trout", "crow", "frog"],
                                                         "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
          {"question": "What makes models smaller?", "choices": {"text": ["data", "pruning", "tests", "dogs"],
                                                                 "label": ["A", "B", "C", "D"]}, "answerKey": "B"}]
ARC = [{"query": f"Question: {d['question']}", "choices": d["choices"]["text"],
        "gold": d["choices"]["label"].index(d["answerKey"])} for d in ARC_HF]
OBQA = [{"query": "The quick brown fox", "choices": ["jumps", "sleeps", "swims", "reads"], "gold": 0},
        {"query": "Lazy dogs often", "choices": ["sleep", "fly", "code", "prune"], "gold": 0}]
HELLA = [{"query": "Fox: The quick brown fox runs. the fox", "endings": ["jumps over the dog.", "reads a book.",
                                                                         "writes code.", "prunes a model."],
          "label": 0},
         {"query": "Testing: Hello world. the test", "endings": ["passes.", "fails.", "is skipped.", "hangs."],
          "label": 1}]
FILES = {"tasks/piqa/validation.jsonl": PIQA, "tasks/mosaic_icl/boolq.jsonl": BOOLQ,
         "tasks/mosaic_icl/winogrande.jsonl": WINO, "tasks/mosaic_icl/arc_easy.jsonl": ARC,
         "tasks/mosaic_icl/arc_challenge.jsonl": ARC, "tasks/mosaic_icl/openbook_qa.jsonl": OBQA,
         "tasks/hellaswag/validation.jsonl": HELLA}


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """A data dir holding a few rows of each task file, in the real files' layouts."""
    for rel, rows in FILES.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tmp_path


@pytest.fixture
def no_harness_index(monkeypatch):
    """Stand in for the installed harness's task index (building the real one takes ~10 s)."""
    monkeypatch.setattr(zs, "harness_task_names", lambda: frozenset(SEVEN + ["mmlu", "lambada_openai"]))


@pytest.fixture
def no_env(monkeypatch):
    for v in ("SHEARKIT_DATA", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)


# -- task resolution -----------------------------------------------------------------------------

def test_shipped_configs_cover_the_seven_tasks():
    tasks = zs.local_tasks()
    assert sorted(zs.standard_names()) == sorted(SEVEN)
    assert all(name == f"{t.standard}_local" for name, t in tasks.items())
    # metrics as the harness defines them: BoolQ and WinoGrande report acc only
    assert {n: t.metrics for n, t in tasks.items()} == {
        "boolq_local": ("acc",), "winogrande_local": ("acc",),
        **{f"{s}_local": ("acc", "acc_norm") for s in SEVEN if s not in ("boolq", "winogrande")}}
    assert sorted(t.relpath for t in tasks.values()) == sorted(FILES)


def test_standard_names_run_local_variants_when_data_is_present(task_dir, no_env):
    assert zs.check_tasks("piqa, boolq,arc_easy_local", data_dir=task_dir) == ["piqa_local", "boolq_local",
                                                                               "arc_easy_local"]
    r = zs.resolve_tasks(["hellaswag"], data_dir=task_dir)[0]
    assert (r.requested, r.name, r.source, r.path) == ("hellaswag", "hellaswag_local", "local",
                                                       task_dir / "tasks/hellaswag/validation.jsonl")


def test_without_data_standard_names_go_to_the_hub(no_env, no_harness_index):
    res = zs.resolve_tasks(["piqa", "hub:boolq", "mmlu"])
    assert [(r.name, r.source) for r in res] == [("piqa", "hub"), ("boolq", "hub"), ("mmlu", "hub")]


def test_hub_prefix_forces_the_harness_task_even_with_local_data(task_dir, no_env, no_harness_index):
    assert [(r.name, r.source) for r in zs.resolve_tasks(["hub:piqa", "piqa"], data_dir=task_dir)] == [
        ("piqa", "hub"), ("piqa_local", "local")]


def test_unknown_task_suggests_a_name(no_env, no_harness_index):
    with pytest.raises(ShearkitError, match="Unknown zero-shot task 'hellaswg'.*Did you mean 'hellaswag'"):
        zs.check_tasks(["hellaswg"])


def test_local_task_without_data_dir_says_what_to_set(no_env):
    with pytest.raises(ShearkitError, match=r"arc_easy_local.*SHEARKIT_DATA"):
        zs.check_tasks(["arc_easy_local"])


def test_local_task_missing_file_names_it(tmp_path, no_env):
    with pytest.raises(ShearkitError, match=r"tasks/mosaic_icl/boolq.jsonl, which is not in the data directory"):
        zs.check_tasks(["boolq_local"], data_dir=tmp_path)


def test_hub_task_while_offline_is_refused_early(no_env, no_harness_index, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShearkitError, match="needs the Hugging Face hub.*'piqa_local' runs offline"):
        zs.check_tasks(["piqa"])


def test_same_task_twice_is_refused(task_dir, no_env):
    with pytest.raises(ShearkitError, match="both run 'piqa_local'"):
        zs.check_tasks(["piqa", "piqa_local"], data_dir=task_dir)


def test_bad_limit_and_batch_size(task_dir, tiny_tokenizer, no_env):
    m = make_tiny("llama")
    with pytest.raises(ShearkitError, match="limit"):
        zs.zeroshot(m, tiny_tokenizer, ["piqa"], limit=0, data_dir=task_dir)
    with pytest.raises(ShearkitError, match="batch_size"):
        zs.zeroshot(m, tiny_tokenizer, ["piqa"], batch_size=0, data_dir=task_dir)


# -- prompts: the local configs build the same requests as the harness's own tasks ---------------

def _harness_yaml(task_path: str) -> dict:
    """A task YAML shipped inside the installed lm_eval package."""
    import lm_eval
    import yaml

    return yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / task_path).read_text())


def test_prompts_match_the_harness_tasks(task_dir, no_env):
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.winogrande import preprocess_winogrande as wino
    from lm_eval.utils import apply_template

    names = ["piqa_local", "boolq_local", "winogrande_local", "arc_easy_local", "openbookqa_local"]
    res = zs.resolve_tasks(names, data_dir=task_dir)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        zs.write_task_configs(res, tmp)
        tasks = TaskManager(include_path=tmp, include_defaults=False).load(names)["tasks"]

    def ours(name, i):
        t = tasks[name]
        doc = t.eval_docs[i]
        return t.doc_to_text(doc), t.doc_to_choice(doc), t.doc_to_target(doc)

    piqa = _harness_yaml("piqa/piqa.yaml")
    for i, d in enumerate(PIQA):
        assert ours("piqa_local", i) == (apply_template(piqa["doc_to_text"], d),
                                         [d["sol1"], d["sol2"]], d["label"])
    boolq = _harness_yaml("super_glue/boolq/default.yaml")
    for i, d in enumerate(BOOLQ_HF):
        assert ours("boolq_local", i) == (apply_template(boolq["doc_to_text"], d), boolq["doc_to_choice"], d["label"])
    for i, d in enumerate(WINO_HF):  # partial evaluation: gold index, contexts as choices, shared continuation
        assert ours("winogrande_local", i) == (wino.doc_to_text(d), wino.doc_to_choice(d), wino.doc_to_target(d))
    arc = _harness_yaml("arc/arc_easy.yaml")
    for i, d in enumerate(ARC_HF):
        assert ours("arc_easy_local", i) == (apply_template(arc["doc_to_text"], d), d["choices"]["text"],
                                             d["choices"]["label"].index(d["answerKey"]))
    assert _harness_yaml("openbookqa/openbookqa.yaml")["doc_to_text"] == "question_stem"
    for i, d in enumerate(OBQA):  # the local query is the stem itself
        assert ours("openbookqa_local", i) == (d["query"], d["choices"], d["gold"])


# -- scores: the harness's numbers equal an independent log-likelihood scorer --------------------

def _loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), tokenising the pair as one string."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def _expected(model, tok, pairs_per_doc, golds, cont_lens):
    acc = acc_norm = 0
    for pairs, gold, lens in zip(pairs_per_doc, golds, cont_lens):
        lls = [_loglik(model, tok, c, x) for c, x in pairs]
        acc += int(max(range(len(lls)), key=lls.__getitem__) == gold)
        acc_norm += int(max(range(len(lls)), key=lambda j: lls[j] / lens[j]) == gold)
    return acc / len(golds), acc_norm / len(golds)


def test_accuracies_equal_an_independent_scorer(task_dir, tiny_tokenizer, no_env):
    model = make_tiny("llama")
    out = zs.zeroshot(model, tiny_tokenizer, "piqa,arc_easy,winogrande,boolq,hellaswag", data_dir=task_dir)
    assert list(out) == ["piqa_local", "arc_easy_local", "winogrande_local", "boolq_local", "hellaswag_local"]

    piqa = _expected(model, tiny_tokenizer,
                     [[(f"Question: {d['goal']}\nAnswer:", " " + s) for s in (d["sol1"], d["sol2"])] for d in PIQA],
                     [d["label"] for d in PIQA], [[len(" " + d["sol1"]), len(" " + d["sol2"])] for d in PIQA])
    assert out["piqa_local"]["metrics"] == pytest.approx({"acc": piqa[0], "acc_norm": piqa[1]})
    arc = _expected(model, tiny_tokenizer, [[(d["query"] + "\nAnswer:", " " + c) for c in d["choices"]] for d in ARC],
                    [d["gold"] for d in ARC], [[len(" " + c) for c in d["choices"]] for d in ARC])
    assert out["arc_easy_local"]["metrics"] == pytest.approx({"acc": arc[0], "acc_norm": arc[1]})
    wino = _expected(model, tiny_tokenizer, [[(c, " " + d["continuation"]) for c in d["context_options"]] for d in WINO],
                     [d["gold"] for d in WINO], [[1, 1] for _ in WINO])
    assert out["winogrande_local"]["metrics"] == pytest.approx({"acc": wino[0]})
    boolq = _expected(model, tiny_tokenizer,
                      [[(d["passage"] + "\nQuestion: " + d["question"] + "?\nAnswer:", " " + c) for c in ("no", "yes")]
                       for d in BOOLQ_HF], [d["label"] for d in BOOLQ_HF], [[3, 4] for _ in BOOLQ_HF])
    assert out["boolq_local"]["metrics"] == pytest.approx({"acc": boolq[0]})

    rec = out["hellaswag_local"]
    import lm_eval

    assert rec["metric"] == "acc_norm" and rec["value"] == rec["metrics"]["acc_norm"]
    assert out["boolq_local"]["metric"] == "acc"
    assert {k: rec[k] for k in ("harness_version", "task_version", "limit", "num_fewshot", "batch_size", "dtype",
                                "n_samples", "source", "requested")} == {
        "harness_version": lm_eval.__version__, "task_version": 1.0, "limit": None, "num_fewshot": 0,
        "batch_size": 1, "dtype": "float32", "n_samples": 2, "source": "local", "requested": "hellaswag"}
    assert set(rec["stderr"]) == {"acc", "acc_norm"} and all(math.isfinite(v) for v in rec["stderr"].values())


def test_limit_and_batch_size_do_not_change_scores(task_dir, tiny_tokenizer, no_env):
    model = make_tiny("qwen2")
    full = zs.zeroshot(model, tiny_tokenizer, ["openbookqa"], batch_size=1, data_dir=task_dir)["openbookqa_local"]
    one = zs.zeroshot(model, tiny_tokenizer, ["openbookqa"], limit=1, batch_size=3,
                      data_dir=task_dir)["openbookqa_local"]
    assert full["n_samples"] == len(OBQA) and one["n_samples"] == 1
    assert (one["limit"], one["batch_size"]) == (1, 3)
    first = _expected(model, tiny_tokenizer, [[(OBQA[0]["query"], " " + c) for c in OBQA[0]["choices"]]],
                      [0], [[len(" " + c) for c in OBQA[0]["choices"]]])
    assert one["metrics"] == pytest.approx({"acc": first[0], "acc_norm": first[1]})


def test_api_evaluate_mixes_perplexity_and_zero_shot(task_dir, tiny_tokenizer, no_env):
    import shearkit

    (task_dir / "tiny.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    out = shearkit.evaluate(make_tiny("gpt2"), tiny_tokenizer, [str(task_dir / "tiny.txt"), "piqa"], seqlen=32,
                            limit=2, data_dir=task_dir)
    assert list(out) == [str(task_dir / "tiny.txt"), "piqa_local"]
    assert out["piqa_local"]["limit"] == 2 and out["piqa_local"]["n_samples"] == 2


# -- real data and the real model ----------------------------------------------------------------

def test_real_task_files_run_offline(data_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert zs.check_tasks(SEVEN, data_dir=data_dir) == [f"{n}_local" for n in SEVEN]
    out = zs.zeroshot(make_tiny("llama"), tiny_tokenizer, ["winogrande", "arc_challenge"], limit=2, data_dir=data_dir)
    assert [r["n_samples"] for r in out.values()] == [2, 2]


@pytest.mark.slow
def test_smollm_piqa_matches_independent_scorer_and_beats_chance(smollm, data_dir):
    model, tok = smollm
    out = zs.zeroshot(model, tok, ["piqa"], limit=100, data_dir=data_dir)["piqa_local"]
    rows = [json.loads(l) for l in (data_dir / "tasks/piqa/validation.jsonl").read_text().splitlines()[:10]]
    head = zs.zeroshot(model, tok, ["piqa"], limit=10, data_dir=data_dir)["piqa_local"]
    exp = _expected(model, tok, [[(f"Question: {d['goal']}\nAnswer:", " " + s) for s in (d["sol1"], d["sol2"])]
                                 for d in rows], [d["label"] for d in rows],
                    [[len(" " + d["sol1"]), len(" " + d["sol2"])] for d in rows])
    assert head["metrics"] == pytest.approx({"acc": exp[0], "acc_norm": exp[1]})
    # SmolLM2-135M scores about 0.68 on PIQA; 0.55 is 2.8 standard errors below at n=100
    assert out["metrics"]["acc"] > 0.55
