"""Kill anywhere, resume to the same result (issue 15, item 1).

For each stage kind a tiny-model command runs uninterrupted (the reference), then again in a fresh
run directory where the child process sends itself SIGKILL at a seeded point inside that stage
(`killpoint.py`: the points are events, so a seed names the same point on every machine), then
once more with `--resume`. The resumed run must end with the reference's plan (bar timings) and
bit-identical weights, and, when a checkpoint of the stage was complete at the kill, it must have
redone less of the stage than the reference did (it continued; it did not start over).

The default suite kills each stage kind once, after its first checkpoint; the slow marker adds
points anywhere in the stage (before the first checkpoint too), anywhere in the whole run, the
other blockwise methods, the other LoRAShear stages, recovery inside a pipeline, FlexiGPT's
training, and one case in a fresh `python -m shearkit.cli`-like interpreter instead of the forked one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shearkit.io.stage_state import differing_keys, flatten

from conftest import make_tiny
from killpoint import Zygote, fresh_run

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks its children (POSIX)")

VOLATILE = {"created", "wall_s", "time_s", "s_per_step", "resumed_from", "trials_wall_s", "eval_time_s"}
COMPUTE = ("forward:", "backward")


@dataclass
class Case:
    """A command, the stage it kills (`stage`: a path fragment of the stage's checkpoint writes) and
    the writes that complete one of its checkpoints (`done`: a regex on the path)."""

    name: str
    argv: list[str]
    stage: str
    done: str
    needs_data: bool = False


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_tokenizer):
    """The working folder: a tiny llama model directory, a text file and an instruction file."""
    root = tmp_path_factory.mktemp("kill")
    make_tiny("llama").save_pretrained(root / "base")
    tiny_tokenizer.save_pretrained(root / "base")
    (root / "text.txt").write_text("the quick brown fox jumps over the lazy dog. pruning makes language models "
                                   "smaller.\n" * 300)
    (root / "instr.json").write_text(json.dumps([{"instruction": "say hello", "input": "", "output": "hello world"}]
                                                * 16))
    return root


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _common(ws: Path) -> list[str]:
    text = ws / "text.txt"
    return ["--calib", text, "--calib-samples", 4, "--calib-seqlen", 16, "--tasks", text, "--eval-seqlen", 16,
            "--limit", 1, "--no-dense-eval"]


def _sets(**kv) -> list[str]:
    out: list[str] = []
    for k, v in kv.items():
        out += ["--set", f"{k.replace('__', '.')}={v}"]
    return out


def _blockwise(ws, method, **extra):
    return Case(f"blockwise-{method}", ["prune", ws / "base", "--method", method, "--ratio", 0.5, *_common(ws),
                                        *_sets(**extra)], f"/{method}/", r"/state\.json$")


def _llm_pruner(ws):
    return Case("gradient-llm-pruner", ["prune", ws / "base", "--method", "llm-pruner", "--ratio", 0.3,
                                        *_common(ws), "--calib-samples", 8,
                                        *_sets(prune__max_calib=8, prune__save_every=2, prune__dense_first=0,
                                               prune__dense_last=0)],
                "/llm-pruner/gradients/", r"/snapshot-\d+$")


def _loraprune(ws):
    return Case("iterative-loraprune", ["prune", ws / "base", "--method", "loraprune", "--ratio", 0.25, *_common(ws),
                                        *_sets(prune__train__data=ws / "text.txt", prune__train__steps=4,
                                               prune__train__seqlen=16, prune__train__batch_size=2,
                                               prune__train__save_every=1, prune__prune_every=1,
                                               prune__dropout=0.1)],
                "/loraprune/checkpoint-", r"/checkpoint-\d+$")


LORASHEAR_SETS = {"gamma": 0.34, "analysis_windows": 2, "analysis_seqlen": 16, "periods": 2, "warmup": 0.25,
                  "train.steps": 4, "train.seqlen": 256, "train.batch_size": 1, "train.save_every": 1,
                  "recovery.steps": 2, "recovery.seqlen": 256, "recovery.batch_size": 1, "recovery.save_every": 1,
                  "dynamic.round_steps": 1, "dynamic.heldout_windows": 2, "dynamic.heldout_seqlen": 16,
                  "dynamic.heldout_examples": 2}


def _lorashear(ws, stage="/lhspg/", done=r"/checkpoint-\d+$", name="lhspg", **more):
    sets = {**LORASHEAR_SETS, **more}
    argv = ["prune", ws / "base", "--method", "lorashear", "--ratio", 0.25, "--tasks", "wikitext2", "--limit", 1,
            "--eval-seqlen", 16, "--no-dense-eval"]
    for k, v in sets.items():
        argv += ["--set", f"prune.{k}={v}"]
    return Case(f"lorashear-{name}", argv, stage, done, needs_data=True)


def _recover(ws):
    return Case("recover", ["recover", ws / "base", "--data", ws / "instr.json", "--steps", 4, "--seqlen", 128,
                            "--batch-size", 2, "--save-every", 1],
                "/recovery/checkpoint-", r"/checkpoint-\d+$")


def _pipeline_recovery(ws):
    return Case("pipeline-recovery", ["prune", ws / "base", "--method", "wanda", "--ratio", 0.5, *_common(ws),
                                      "--recover", 3, "--recover-data", ws / "instr.json",
                                      *_sets(recover__seqlen=128, recover__batch_size=2, recover__save_every=1)],
                "/recovery/checkpoint-", r"/checkpoint-\d+$")


def _flexigpt(ws):
    return Case("flexigpt-training", ["prune", ws / "base", "--method", "flexigpt", "--blocks", 1, *_common(ws),
                                      *_sets(prune__train__data=ws / "text.txt", prune__train__steps=4,
                                             prune__train__seqlen=16, prune__train__batch_size=2,
                                             prune__train__save_every=1, prune__rank=4)],
                "/flexigpt/checkpoint-", r"/checkpoint-\d+$")


def _block_scores(ws, importance="bi"):
    return Case(f"block-scores-{importance}", ["prune", ws / "base", "--method", "shortgpt", "--blocks", 1,
                                               *_common(ws), *_sets(prune__importance=importance)],
                "/shortgpt/block-scores/", r"/snapshot-\d+$")


# -- running, windows, comparing -------------------------------------------------------------------

_REFS: dict[str, tuple[Path, list[str]]] = {}


def _run(zygote, ws, argv, out: str, tag: str, **kw) -> int:
    return zygote.run([*argv, "--out", out], cwd=ws, log_dir=ws / "logs", tag=tag, **kw)


def _stderr(ws, tag: str) -> str:
    return (ws / "logs" / f"{tag}.err").read_text()


def _norm(label: str) -> str:
    """An event label without its run directory and temporary names (comparable across runs)."""
    kind, _, path = label.partition(":")
    if not kind.startswith("replace"):
        return label
    return f"{kind}:" + re.sub(r"\.(tmp|old)-[^/]+", r".\1", path.partition("/")[2])


def reference(zygote, ws, case: Case, data_dir=None) -> tuple[Path, list[str]]:
    """The uninterrupted run of `case` (once per module) and its events."""
    if case.name not in _REFS:
        out, events = f"ref-{case.name}", ws / "logs" / f"ref-{case.name}.events.json"
        rc = _run(zygote, ws, _argv(case, data_dir), out, f"ref-{case.name}", events=events)
        assert rc == 0, _stderr(ws, f"ref-{case.name}")
        _REFS[case.name] = (ws / out, json.loads(events.read_text()))
    return _REFS[case.name]


def _argv(case: Case, data_dir) -> list:
    return [*case.argv, *(["--data-dir", data_dir] if case.needs_data else [])]


def stage_window(events: list[str], case: Case) -> tuple[int, int, int] | None:
    """(start, first completed checkpoint, last write) of the stage, as 1-based event numbers: the
    stage starts after the last write before its first checkpoint write."""
    hits = [i for i, e in enumerate(events, 1) if case.stage in e and e.startswith("replace")]
    if not hits:
        return None
    done = [i for i in hits if events[i - 1].startswith("replace-after:") and re.search(case.done, events[i - 1])]
    before = [i for i, e in enumerate(events[:hits[0] - 1], 1) if e.startswith("replace-after:")]
    return (before[-1] + 1 if before else 1), (done[0] if done else hits[0]), hits[-1]


def _work(events: list[str], case: Case) -> int:
    """Forward and backward events within the stage."""
    w = stage_window(events, case)
    return 0 if w is None else sum(e.startswith(COMPUTE) for e in events[w[0] - 1:w[2]])


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def assert_same_result(a: Path, b: Path) -> None:
    """Every tensor of the saved model (and of the masks) equal bit for bit; the plan and the final
    evaluation equal but for timings."""
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.safetensors")
                   if p.relative_to(a).parts[0] in ("model", "masks.safetensors"))
    assert files and files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*.safetensors")
                                     if p.relative_to(b).parts[0] in ("model", "masks.safetensors"))
    for f in files:
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys(), f
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{f}: {k}"
    if (a / "plan.json").exists():
        pa, pb = (_strip(json.loads((d / "plan.json").read_text())) for d in (a, b))
        fa, fb = flatten(pa), flatten(pb)
        assert pa == pb, {k: (fa.get(k), fb.get(k)) for k in differing_keys(pa, pb)}
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma.get("tasks") == mb.get("tasks")


def kill_and_resume(zygote, ws, case: Case, point: str, seed: int, data_dir=None, runner=None) -> None:
    """Kill `case` at a seeded event (`point`: "after-checkpoint" in the stage after its first
    checkpoint, "stage" anywhere in it, "anywhere" in the whole run), resume it, compare."""
    ref_dir, ref_events = reference(zygote, ws, case, data_dir)
    start, first_done, last = stage_window(ref_events, case) or pytest.fail(f"{case.name}: no '{case.stage}' write")
    lo, hi = {"after-checkpoint": (first_done, last), "stage": (start, last), "anywhere": (1, len(ref_events) - 1)}[point]
    k = random.Random(f"{case.name}-{point}-{seed}").randint(lo, hi)
    tag, out = f"{case.name}-{point}-{seed}", f"run-{case.name}-{point}-{seed}"
    shutil.rmtree(ws / out, ignore_errors=True)
    run = runner or (lambda argv, **kw: zygote.run(argv, cwd=ws, log_dir=ws / "logs", **kw))
    ev = ws / "logs" / f"{tag}.events.json"
    rc = run([*_argv(case, data_dir), "--out", out], tag=f"{tag}-killed", kill_at=k, events=ev)
    assert rc == -9, f"expected a SIGKILL at event {k}, got exit {rc}: {_stderr(ws, f'{tag}-killed')}"
    killed = json.loads(Path(f"{ev}.killed").read_text())
    print(f"{case.name}: killed at event {k} of {len(ref_events)} (stage {start}..{last}): {killed['label']}")
    assert killed["index"] == k and _norm(killed["label"]) == _norm(ref_events[k - 1]), (killed, ref_events[k - 1])
    rc = run([*_argv(case, data_dir), "--out", out, "--resume"], tag=f"{tag}-resumed", events=ev)
    assert rc == 0, _stderr(ws, f"{tag}-resumed")
    assert_same_result(ref_dir, ws / out)
    resumed = json.loads(ev.read_text())
    if k >= first_done:  # a checkpoint of the stage was complete at the kill: the resumed run went on from it
        redone, whole = _work(resumed, case), _work(ref_events, case)
        assert redone < whole, f"{case.name}: killed at {killed}, the resumed run redid the whole stage ({redone})"


# -- the default suite: one point per stage kind ---------------------------------------------------

DEFAULT = {"blockwise-sparsegpt": lambda ws: _blockwise(ws, "sparsegpt"),
           "gradient-llm-pruner": _llm_pruner,
           "iterative-loraprune": _loraprune,
           "lorashear-lhspg": _lorashear,
           "block-scores-bi": _block_scores,
           "recover": _recover}


@pytest.mark.parametrize("kind", list(DEFAULT))
def test_killed_stage_resumes_to_the_same_result(zygote, ws, request, kind):
    case = DEFAULT[kind](ws)
    data_dir = request.getfixturevalue("data_dir") if case.needs_data else None
    kill_and_resume(zygote, ws, case, "after-checkpoint", 0, data_dir)


def test_resume_with_another_recipe_is_refused_naming_the_keys(zygote, ws):
    """`prune --resume` and `recover --resume` with changed options: refused before anything runs,
    the message names each differing key with its old and new value; the run directory is untouched."""
    case = _blockwise(ws, "sparsegpt")
    ref_dir, _ = reference(zygote, ws, case)
    before = {p: p.read_bytes() for p in ref_dir.rglob("*") if p.is_file()}
    argv = [a if a != 0.5 else 0.4 for a in case.argv] + ["--calib-samples", 5]
    rc = _run(zygote, ws, [*argv, "--resume"], ref_dir.name, "refused-prune")
    err = " ".join(_stderr(ws, "refused-prune").split())
    assert rc == 2 and "another recipe" in err, err
    assert "prune.ratio: 0.5 -> 0.4" in err and "calib.samples: 4 -> 5" in err, err
    assert {p: p.read_bytes() for p in ref_dir.rglob("*") if p.is_file()} == before

    rec = _recover(ws)
    rec_dir, _ = reference(zygote, ws, rec)
    rc = _run(zygote, ws, [*[6 if a == 4 else a for a in rec.argv], "--resume"], rec_dir.name, "refused-recover")
    err = " ".join(_stderr(ws, "refused-recover").split())
    assert rc == 2 and "recover.steps: 4 -> 6" in err, err


def test_stage_checkpoints_refuse_a_fresh_run_and_other_settings(tmp_path):
    """A stage's checkpoint is not mixed into a fresh run, nor resumed under other settings or data:
    the message names what differs (the blockwise loop and the gradient pass, through the API)."""
    import shearkit
    from shearkit.errors import ShearkitError

    calib = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    shearkit.prune(make_tiny("llama"), None, "wanda", 0.5, calib=calib, run_dir=tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w" / "wanda").iterdir())[-2:] == ["block-0002.safetensors", "state.json"]
    with pytest.raises(ShearkitError, match="already holds the checkpoint"):
        shearkit.prune(make_tiny("llama"), None, "wanda", 0.5, calib=calib, run_dir=tmp_path / "w")
    with pytest.raises(ShearkitError, match=r"other config\.ratio"):
        shearkit.prune(make_tiny("llama"), None, "wanda", 0.4, calib=calib, run_dir=tmp_path / "w", resume=True)
    with pytest.raises(ShearkitError, match="other calib"):
        shearkit.prune(make_tiny("llama"), None, "wanda", 0.5, calib=calib.flip(0), run_dir=tmp_path / "w",
                       resume=True)
    with pytest.raises(ShearkitError, match="other fingerprint"):
        shearkit.prune(make_tiny("llama", seed=1), None, "wanda", 0.5, calib=calib, run_dir=tmp_path / "w",
                       resume=True)

    opts = {"calib": calib, "run_dir": tmp_path / "g", "save_every": 1, "dense_first": 0, "dense_last": 0}
    plan = shearkit.prune(make_tiny("llama"), None, "llm-pruner", 0.3, **opts)
    assert [p.name for p in (tmp_path / "g" / "llm-pruner" / "gradients").iterdir()] == ["snapshot-00000004"]
    again = shearkit.prune(make_tiny("llama"), None, "llm-pruner", 0.3, resume=True, **opts)  # from the last snapshot
    assert again.layers == plan.layers
    with pytest.raises(ShearkitError, match=r"statistics pass .* other options\.batch_size"):
        shearkit.prune(make_tiny("llama"), None, "llm-pruner", 0.3, resume=True, batch_size=2, **opts)


# -- more points, under the slow marker ------------------------------------------------------------

SLOW = {**DEFAULT,
        "blockwise-wanda": lambda ws: _blockwise(ws, "wanda"),
        "blockwise-magnitude": lambda ws: _blockwise(ws, "magnitude"),
        "blockwise-besa": lambda ws: _blockwise(ws, "besa", prune__granularity="layer", prune__optimizer="adamw"),
        "blockwise-sparsegpt-every-2": lambda ws: Case("blockwise-sparsegpt-every-2",
                                                       _blockwise(ws, "sparsegpt", prune__save_every=2).argv,
                                                       "/sparsegpt/", r"/state\.json$"),
        "lorashear-trials": lambda ws: _lorashear(ws, "/knowledge-distribution/", r"(/state\.json|/snapshot-\d+)$",
                                                  "trials", proxy="taylor"),
        "lorashear-dynamic-recovery": lambda ws: _lorashear(ws, "/dynamic-recovery/", r"/checkpoint-\d+$",
                                                            "dynamic"),
        "pipeline-recovery": _pipeline_recovery,
        "block-scores-ppl": lambda ws: _block_scores(ws, "ppl"),
        "flexigpt-training": _flexigpt}


# every stage kind at a point anywhere in its stage (also before its first checkpoint), and the
# default kinds once more anywhere in the whole run (evaluation and saving included)
SLOW_POINTS = [(kind, "stage", 1) for kind in SLOW] + [(kind, "anywhere", 2) for kind in DEFAULT]


@pytest.mark.slow
@pytest.mark.parametrize("kind, point, seed", SLOW_POINTS, ids=[f"{k}-{p}-{s}" for k, p, s in SLOW_POINTS])
def test_killed_anywhere_resumes_to_the_same_result(zygote, ws, request, kind, point, seed):
    case = SLOW[kind](ws)
    data_dir = request.getfixturevalue("data_dir") if case.needs_data else None
    kill_and_resume(zygote, ws, case, point, seed, data_dir)


@pytest.mark.slow
def test_killed_in_a_fresh_interpreter(zygote, ws):
    """The same harness without the fork: a new interpreter per command, as `python -m shearkit.cli`."""
    case = _llm_pruner(ws)
    kill_and_resume(zygote, ws, case, "stage", 3,
                    runner=lambda argv, **kw: fresh_run(argv, cwd=ws, log_dir=ws / "logs", **kw))
