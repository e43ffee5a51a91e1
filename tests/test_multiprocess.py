"""Several processes: the training loops of loraprune, lorashear and flexigpt under `accelerate launch`
(2 processes on the CPU, gloo) against one process at the same global batch; the FSDP configs of
configs/accelerate/ on the CPU; weight-shared blocks (FlexiGPT) under FSDP.

The runs themselves are in multiprocess_worker.py (one process: plain `python`; two: `accelerate launch
--config_file configs/accelerate/<config>.yaml --num_processes 2`). `accelerate launch --cpu` is not
used: it starts one process whatever --num_processes says; the DDP config's MULTI_GPU launcher starts
two, and the Trainer (the model on the CPU) joins them with gloo.

Tolerances. One process with 4 sequences and two with 2 each run the same examples per step with the
same normalisation (the sampler and the Trainer's loss scaling), so the losses and weights differ
only by float32 summation order (one batch's gradient against two half-batch gradients summed by the
all-reduce): we saw at most 5e-7 on losses near 5.7 and 2.2e-6 on weights. Losses are compared at
atol 1e-5 and weights at atol 1e-5 / rtol 1e-4, as tests/test_recovery.py's DDP test does: far
below what a real fault moves (a process training alone on its half-batch moved LoRAShear's losses
by 3e-2). LoRA dropout is 0: a dropout mask is drawn per process, so with dropout the two runs
differ by design, not by a fault.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"
WORKER = Path(__file__).resolve().parent / "multiprocess_worker.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"
# accelerate's refusal of fsdp_sync_module_states on the CPU, as worded before 1.16 and since
FSDP_CPU_REFUSALS = ("RuntimeError: There are currently no available devices found, must be one of",
                     "RuntimeError: FSDP parameter initialization with `sync_module_states=True` is not supported on cpu.")
WORDS = ("the quick brown fox jumps over lazy dog pruning makes language models smaller hello world this is a "
         "test of shearkit").split()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer):
    """The tiny tokenizer on disk and a text of varied sentences (identical examples would hide a wrong
    split of the batch between processes)."""
    d = tmp_path_factory.mktemp("mp")
    tiny_tokenizer.save_pretrained(d / "tok")
    rng = random.Random(0)
    (d / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(80)))
    return d / "tok", d / "text.txt"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def one(out: Path, *args: str) -> dict:
    """The worker in one plain process; its record."""
    subprocess.run([sys.executable, str(WORKER), *args, str(out)], check=True, env=_env(), timeout=300)
    return torch.load(f"{out}.rank0.pt", weights_only=False)


def two(out: Path, *args: str, config: str = "ddp.yaml", launch: tuple[str, ...] = (), flags: tuple[str, ...] = (),
        check: bool = True) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """The worker under `accelerate launch --config_file CONFIG --num_processes 2`; every process's record."""
    cmd = [str(ACCELERATE), "launch", "--config_file", str(CONFIGS / config), "--num_processes", "2",
           "--main_process_port", _port(), *launch, str(WORKER), *args, str(out), *flags]
    r = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    recs = [torch.load(f"{out}.rank{k}.pt", weights_only=False) for k in range(2)
            if Path(f"{out}.rank{k}.pt").exists()]
    return r, recs


def units(plan: dict, layers: int, kv_groups: int, channels: int) -> dict[tuple, bool]:
    """(layer, kind, index) -> pruned, over every KV group and MLP channel of the model."""
    out = {}
    for i in range(layers):
        e = plan["layers"].get(str(i), {})
        for kind, n in (("kv_groups", kv_groups), ("mlp_channels", channels)):
            gone = set(e.get(kind, []))
            out.update({(i, kind, k): k in gone for k in range(n)})
    return out


def agreement(a: dict, b: dict) -> float:
    ua, ub = units(a, 3, 2, 96), units(b, 3, 2, 96)  # conftest's tiny llama: 3 layers, 2 KV groups, 96 channels
    return sum(ua[k] == ub[k] for k in ua) / len(ua)


# -- the methods' training loops: two processes against one ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["loraprune", "lorashear", "flexigpt"])
def test_two_processes_match_one(method, files, tmp_path, data_dir):
    """Global batch 4: one process with 4 sequences per step against 2 processes with 2 each under
    `accelerate launch` (DDP, gloo): the same loss curve of every training stage, the same pruned
    units (>= 99% required; all of them agree), and the same final weights."""
    tok, text = files
    ref = one(tmp_path / "one", "method", method, "4", str(tok), str(text))
    r, recs = two(tmp_path / "two", "method", method, "2", str(tok), str(text))
    assert len(recs) == 2 and all(rec["world"] == 2 for rec in recs)
    stages = {"loraprune": ["loraprune"], "lorashear": ["lhspg", "dynamic recovery"], "flexigpt": ["flexigpt"]}[method]
    assert [run["desc"] for run in ref["runs"]] == stages
    for rec in recs:
        assert [run["desc"] for run in rec["runs"]] == stages
        # really two processes with DDP (not two independent one-process runs)
        assert all(run["processes"] == 2 and run["wrapper"] == "DistributedDataParallel" for run in rec["runs"])
    assert all(run["processes"] == 1 for run in ref["runs"])
    for a, b, c in zip(ref["runs"], recs[0]["runs"], recs[1]["runs"]):
        torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), atol=1e-5, rtol=0)
        assert b["losses"] == c["losses"]  # reduced over the processes: the same record on both
    plan1, plan2 = ref["plan"], recs[0]["plan"]
    if method == "flexigpt":
        assert plan2["replaced"] == plan1["replaced"] and plan1["replaced"]
    else:
        assert agreement(plan1, plan2) >= 0.99
        assert plan2["layers"] == plan1["layers"]  # in fact every unit agrees
        assert plan2["ratio_achieved"] == plan1["ratio_achieved"]
    w1, w2 = ref["weights"], recs[0]["weights"]
    assert w1.keys() == w2.keys()
    for n, w in w1.items():
        torch.testing.assert_close(w2[n], w, atol=1e-5, rtol=1e-4)
    for n, w in w2.items():  # the two processes hand back the same model
        assert torch.equal(recs[1]["weights"][n], w)


# -- FSDP ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fsdp_config_on_cpu_is_refused_or_dropped(files, tmp_path):
    """configs/accelerate/fsdp.yaml on the CPU, two processes, two optimizer steps of shearkit.recover.
    As shipped (fsdp_sync_module_states: true) accelerate refuses to build its FSDP plugin without an
    accelerator; with that setting off it builds it, then drops it: the processes train under DDP
    (MULTI_CPU, gloo), with no warning."""
    tok, text = files
    r, recs = two(tmp_path / "shipped", "recover", "2", str(tok), str(text), config="fsdp.yaml", check=False)
    assert r.returncode != 0 and not recs
    assert any(m in r.stderr for m in FSDP_CPU_REFUSALS), r.stderr[-2000:]

    r, recs = two(tmp_path / "nosync", "recover", "2", str(tok), str(text), config="fsdp.yaml",
                  launch=("--fsdp_sync_module_states", "false"))
    assert len(recs) == 2
    for rec in recs:
        (run,) = rec["runs"]
        assert run["distributed_type"] == "MULTI_CPU" and run["wrapper"] == "DistributedDataParallel"
        assert run["processes"] == 2 and len(run["losses"]) == 2
    assert "FSDP" not in r.stderr.replace("FSDP_", "")  # dropped without a word


@pytest.mark.slow
def test_trainer_under_fsdp_wrapping(files, tmp_path):
    """The Trainer under accelerate's own FSDP wrapping (fsdp.yaml: FSDP1, one unit per decoder block,
    use_orig_params), put in place on the CPU by hand since accelerate drops FSDP there: two optimizer
    steps with the losses of one process at the same global batch, and every process clipping by the
    global gradient norm of one process (FSDP's own clip: each process holds a shard of each gradient;
    the trainable parameters' shards alone gave each process its part, sqrt(n0^2 + n1^2) = n, before).
    After `fit` the Trainer hands the model back whole (every process gathers the full parameters and
    the FSDP units are unwrapped): each process's model equals one process's."""
    tok, text = files
    ref = one(tmp_path / "one", "recover", "4", str(tok), str(text))
    r, recs = two(tmp_path / "fsdp", "recover", "2", str(tok), str(text), config="fsdp.yaml",
                  launch=("--fsdp_sync_module_states", "false"), flags=("--force-fsdp",))
    assert len(recs) == 2
    for rec in recs:
        (run,) = rec["runs"]
        assert run["distributed_type"] == "FSDP" and run["wrapper"] == "FullyShardedDataParallel"
        assert run["processes"] == 2 and len(run["losses"]) == 2
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["runs"][0]["losses"]), atol=1e-5,
                                   rtol=0)
        assert run["whole_after_fit"] is True  # the Trainer hands the model back whole
        w, ref_w = rec["weights"], ref["weights"]
        assert w.keys() == ref_w.keys() and all(torch.allclose(w[k], ref_w[k], atol=1e-5, rtol=1e-4) for k in w)
    assert ref["runs"][0]["whole_after_fit"] is True
    n0, n1, n = (torch.tensor(rec["grad_norms"]) for rec in (*recs, ref))
    torch.testing.assert_close(n0, n, atol=1e-5, rtol=1e-5)  # the global norm in every process
    torch.testing.assert_close(n1, n, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_shared_blocks_under_fsdp(files, tmp_path):
    """FlexiGPT's shared blocks (a copy computing with another block's projection weights) under FSDP,
    by the Trainer with accelerate's FSDP wrapping put in place on the CPU.
    fsdp_shared_blocks.yaml (NO_WRAP, one unit): the shared weights sit once in the one flat parameter;
    at every forward the copy computes with the base's own tensor, whole; two optimizer steps leave the
    base weights unchanged and still that one tensor, and train the adapters as one process does.
    fsdp.yaml (a unit per block): shearkit refuses it, before the model is changed; forced past the
    refusal, FSDP hands the copy its base's weight as a flat shard and the forward fails."""
    tok, text = files
    ref = one(tmp_path / "one", "shared", "4", str(tok), str(text))
    assert "refused" not in ref and "prune_refused" not in ref and ref["after"]["one_tensor"]

    r, recs = two(tmp_path / "whole", "shared", "2", str(tok), str(text), config="fsdp_shared_blocks.yaml",
                  launch=("--fsdp_sync_module_states", "false"), flags=("--force-fsdp",))
    assert len(recs) == 2
    i, j = ref["replaced"]
    for rec in recs:
        assert "refused" not in rec and "prune_refused" not in rec and "fsdp_error" not in rec
        assert rec["wrapper"] == "FullyShardedDataParallel" and rec["replaced"] == [i, j]
        (run,) = [x for x in rec["runs"] if x["desc"] == "train"]
        assert run["distributed_type"] == "FSDP" and run["processes"] == 2
        torch.testing.assert_close(torch.tensor(run["losses"]),
                                   torch.tensor([x for x in ref["runs"] if x["desc"] == "train"][0]["losses"]),
                                   atol=1e-5, rtol=0)
        fqns = rec["flat_fqns"]
        for p in ("self_attn.q_proj", "mlp.down_proj"):
            assert fqns.count(f"model.layers.{j}.{p}.weight") == 1  # the shared weight, once
            assert not any(f.startswith(f"model.layers.{i}.{p}.") and f.endswith(".weight") and "adapter" not in f
                           and "norm" not in f for f in fqns)  # the copy owns no weight of its own
        assert rec["flat_numel"] == rec["model_numel"]  # nothing stored twice
        assert len(rec["seen"]) == 7 * 2 and all(s["shape"] and s["same_tensor"] and s["values"] for s in rec["seen"])
        assert rec["after"]["base_unchanged"] and rec["after"]["one_tensor"]
        for n, a in ref["after"]["adapters"].items():
            torch.testing.assert_close(rec["after"]["adapters"][n], a, atol=1e-5, rtol=1e-4)
    for n, a in recs[0]["after"]["adapters"].items():
        assert torch.equal(recs[1]["after"]["adapters"][n], a)

    r, recs = two(tmp_path / "layers", "shared", "2", str(tok), str(text), config="fsdp.yaml",
                  launch=("--fsdp_sync_module_states", "false"), flags=("--force-fsdp",))
    assert len(recs) == 2
    for rec in recs:
        assert "TRANSFORMER_BASED_WRAP wrapping" in rec["prune_refused"] and not rec["changed_after_refusal"]
        assert rec["refused"] == rec["prune_refused"] and "fsdp_shared_blocks.yaml" in rec["refused"]
        assert rec["fsdp_error"].startswith("RuntimeError: size mismatch")
    # the copy met its base's weight flattened and sharded: 4096 of its 64 x 64 entries on one process,
    # none on the other
    assert sorted(rec["seen"][0]["shape"][0] for rec in recs) == [0, 4096]
    assert not any(rec["seen"][0]["values"] for rec in recs)


def test_shared_blocks_refuse_fsdp_that_splits_them(monkeypatch):
    """The launcher's FSDP settings with a per-block wrap: FlexiGPT (training) and shearkit extend are
    refused before the model is touched; NO_WRAP and no FSDP pass."""
    import shearkit
    from shearkit.errors import ShearkitError
    from shearkit.surgery.shared_block import has_shared_blocks, refuse_split_sharing

    from conftest import VOCAB, make_tiny

    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for policy in ("TRANSFORMER_BASED_WRAP", "size_based_wrap"):
        monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", policy)
        model = make_tiny("llama")
        with pytest.raises(ShearkitError, match=f"FSDP's {policy.upper()} wrapping.*fsdp_shared_blocks.yaml"):
            shearkit.prune(model, None, "flexigpt", calib=calib, blocks=1, rank=4)
        assert not has_shared_blocks(model)
    with pytest.raises(ShearkitError, match="fsdp_shared_blocks.yaml"):
        shearkit.extend(make_tiny("llama"), None, add_blocks=1, rank=4)
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "NO_WRAP")
    refuse_split_sharing()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    refuse_split_sharing()


def test_training_shared_parts_restores_flags_when_a_wrapper_adds_parameters():
    """FSDP adds (flat) parameters to the model it wraps inside `train_only_shared_parts`; leaving the
    block restores the flags of the parameters it found and leaves the new ones alone (it used to fail
    with a KeyError on them, hiding FSDP's own error)."""
    from torch import nn

    from shearkit.surgery.shared_block import share_block, shared_parameters, train_only_shared_parts

    from conftest import make_tiny

    model = make_tiny("llama")
    share_block(model, 2, 0, 4)
    model.lm_head.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with train_only_shared_parts(model) as trainable:
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable) == set(
            shared_parameters(model))
        model.register_parameter("flat", nn.Parameter(torch.zeros(3)))
    assert model.flat.requires_grad
    del model.flat
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_the_cli_under_accelerate_launch_matches_one_process(tmp_path, files, tiny_tokenizer):
    """`accelerate launch -m shearkit.cli prune ... --method loraprune` with 2 processes × 2 sequences: the
    main process alone writes the run directory (no lock refusal in the second), and the saved model and
    losses equal one process × 4 sequences."""
    from conftest import make_tiny

    tok, text = files
    base = tmp_path / "base"
    make_tiny("llama").save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    common = ["prune", str(base), "--method", "loraprune", "--ratio", "0.3", "--tasks", str(text), "--eval-seqlen",
              "16", "--limit", "2", "--no-dense-eval", "--set", "prune.train.data=" + str(text),
              "--set", "prune.train.steps=4", "--set", "prune.train.seqlen=32", "--set", "prune.dropout=0",
              "--set", "prune.train.grad_accum=1"]
    one_ = subprocess.run([sys.executable, "-m", "shearkit.cli", *common, "--set", "prune.train.batch_size=4",
                           "--out", str(tmp_path / "one")], env=_env(), timeout=300, capture_output=True, text=True)
    assert one_.returncode == 0, one_.stderr[-3000:]
    cmd = [str(ACCELERATE), "launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2",
           "--main_process_port", _port(), "-m", "shearkit.cli", *common, "--set", "prune.train.batch_size=2",
           "--out", str(tmp_path / "two")]
    two_ = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True)
    assert two_.returncode == 0, two_.stderr[-3000:]
    assert "being written by another shearkit process" not in two_.stderr
    import json

    from safetensors.torch import load_file

    marker = json.loads((tmp_path / "two" / ".shearkit-run").read_text())
    assert marker["status"] == "complete"
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m1["prune"]["ratio_achieved"] == m2["prune"]["ratio_achieved"]
    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(w1[k].shape == w2[k].shape for k in w1)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4) for k in w1)


def test_each_process_resumes_with_its_own_dropout_stream(files, tmp_path):
    """2 processes with LoRA dropout: each draws its own masks (the second process's RNG is seeded apart
    from the main one's, as the rows of one process's batch get different masks), and a run resumed from
    its step-2 checkpoint ends with the adapters and losses of the uninterrupted run: the checkpoint keeps
    every process's RNG state (with only the main process's, the second resumed with its stream)."""
    tok, text = files
    _, recs = two(tmp_path / "resume", "resume", "2", str(tok), str(text))
    assert len(recs) == 2
    for rec in recs:
        assert rec["resumed_from"] == 2
        assert rec["losses"][0] == rec["losses"][1]
        assert rec["whole"].keys() == rec["resumed"].keys()
        assert all(torch.equal(rec["whole"][k], rec["resumed"][k]) for k in rec["whole"])
    assert recs[0]["dropout_draw"] != recs[1]["dropout_draw"]