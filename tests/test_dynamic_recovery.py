"""Dynamic knowledge recovery (LoRAShear Alg. 5): the mixture data and its resumable weighted sampler,
`mix_weights`, and `dynamic_recover` end to end on a tiny model (weights follow the degradation,
phases switch and training stops on convergence, a stopped run resumes to the same adapters and
round records)."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from conftest import make_tiny
from shearkit.errors import ShearkitError
from shearkit.recovery.config import RecoverConfig
from shearkit.recovery.data import TrainData
from shearkit.recovery.dynamic import (DynamicConfig, build_sources, dense_reference, dynamic_recover, mix_weights,
                                       pooled_ppl)
from shearkit.recovery.loop import Callback
from shearkit.recovery.mixture import MixtureData, MixtureSampler

RANGES = {"a": (0, 10), "b": (10, 40), "c": (40, 45)}


def _draws(sampler: MixtureSampler, steps: range, ga: int = 1, np_: int = 1) -> list[int]:
    return [i for s in steps for m in range(ga) for p in range(np_) for i in sampler.indices(s, m, p)]


def _source(i: int) -> str:
    return next(k for k, (a, b) in RANGES.items() if a <= i < b)


# -- sampler ---------------------------------------------------------------------------------------------

def test_source_frequencies_follow_the_weights():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    s = MixtureSampler(RANGES, batch_size=4, grad_accum=2, processes=1, seed=7, weights=weights)
    draws = _draws(s, range(500), ga=2)
    n = len(draws)
    freq = Counter(_source(i) for i in draws)
    for k, p in weights.items():
        se = math.sqrt(p * (1 - p) / n)
        assert abs(freq[k] / n - p) < 4 * se, (k, freq[k] / n, p)
    assert s.drawn(500) == {k: freq[k] for k in RANGES}


def test_each_source_is_walked_without_replacement():
    s = MixtureSampler(RANGES, batch_size=3, grad_accum=1, processes=2, seed=1)
    per: dict[str, list[int]] = {k: [] for k in RANGES}
    for i in _draws(s, range(200), np_=2):
        per[_source(i)].append(i)
    for k, (a, b) in RANGES.items():
        n = b - a
        full = len(per[k]) // n
        assert full >= 2  # several passes over every source
        for e in range(full):  # each pass is a permutation of the source
            assert sorted(per[k][e * n:(e + 1) * n]) == list(range(a, b))
        assert per[k][:n] != per[k][n:2 * n]  # a new permutation per pass


def test_weight_zero_sources_are_never_drawn_and_rounds_switch_at_their_step():
    s = MixtureSampler(RANGES, batch_size=4, grad_accum=1, processes=1, seed=0, weights={"a": 1, "b": 0, "c": 1})
    s.set_weights(30, {"b": 1.0})  # from step 30 only b
    before = {_source(i) for i in _draws(s, range(30))}
    after = {_source(i) for i in _draws(s, range(30, 60))}
    assert before == {"a", "c"} and after == {"b"}
    with pytest.raises(ShearkitError, match="not sources of the mixture"):
        s.set_weights(0, {"d": 1.0})
    with pytest.raises(ShearkitError, match="positive"):
        s.set_weights(0, {"a": 0.0})


def test_state_round_trip_reproduces_the_draws():
    """A sampler restored from a (JSON) state draws what the original does, even for steps it never
    computed before; changing a later round leaves the earlier draws alone."""
    a = MixtureSampler(RANGES, batch_size=2, grad_accum=2, processes=1, seed=5)
    a.set_weights(0, {"a": 0.2, "b": 0.2, "c": 0.6})
    early = [a.indices(s, m) for s in range(40) for m in range(2)]  # cached under the first round only
    a.set_weights(40, {"a": 0.9, "b": 0.1})
    a.set_weights(90, {"b": 0.5, "c": 0.5})
    assert [a.indices(s, m) for s in range(40) for m in range(2)] == early
    b = MixtureSampler(RANGES, batch_size=2, grad_accum=2, processes=1, seed=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [b.indices(s, m) for s in range(120, 150) for m in range(2)] == \
           [a.indices(s, m) for s in range(120, 150) for m in range(2)]
    assert [b.indices(s, m) for s in range(150) for m in range(2)] == \
           [a.indices(s, m) for s in range(150) for m in range(2)]
    with pytest.raises(ShearkitError, match="same sources"):
        MixtureSampler({"x": (0, 3)}, 1, 1, 1, 0).load_state_dict(a.state_dict())


def test_mixture_data_joins_sources():
    t = TrainData([[1, 2], [3, 4]], [[1, 2], [3, 4]], "text", {"dataset": "t"})
    i = TrainData([[5, 6, 7]], [[-100, 6, 7]], "instruction", {"dataset": "i"})
    m = MixtureData.join({"t": t, "i": i})
    assert m.ranges == {"t": (0, 2), "i": (2, 3)} and m.data.mode == "mixed" and len(m.data) == 3
    assert m.data.labels[2] == [-100, 6, 7] and m.records == {"t": t.record, "i": i.record}
    assert MixtureData.join({"t": t}).data.mode == "text"
    with pytest.raises(ShearkitError, match="no training examples"):
        MixtureData.join({"t": t, "e": TrainData([], [], "text")})


# -- weights -------------------------------------------------------------------------------------------

def test_mix_weights_follow_degradation_with_a_floor():
    deg = {"a": 0.6, "b": 0.2, "c": 0.0, "d": -0.3}  # d improved: clipped at 0
    floor = 0.2
    w = mix_weights(deg, floor)
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["a"] > w["b"] > w["c"] == w["d"] == pytest.approx(floor / len(deg))  # the floor is each one's minimum
    assert (w["a"] - floor / 4) / (w["b"] - floor / 4) == pytest.approx(deg["a"] / deg["b"])  # proportional above it
    assert mix_weights({"a": 0.0, "b": -1.0}, 0.1) == {"a": 0.5, "b": 0.5}  # nothing degraded: uniform
    assert mix_weights({"a": 1.0, "b": 0.0}, 0.0) == {"a": 1.0, "b": 0.0}
    with pytest.raises(ShearkitError, match="floor"):
        mix_weights(deg, 1.5)
    with pytest.raises(ShearkitError, match="phases"):
        DynamicConfig(phases=[["c4"], []])
    with pytest.raises(ShearkitError, match="more than once"):
        DynamicConfig(phases=[["c4"], ["c4"]])


def test_config_parses_without_torch():
    """A recipe section can be built from DynamicConfig without loading the training stack."""
    import subprocess
    import sys

    code = ("import sys\nfrom shearkit.recovery.dynamic_config import DynamicConfig\n"
            "DynamicConfig(phases=[['c4'], ['alpaca']])\nassert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# -- end to end on a tiny model --------------------------------------------------------------------------

TEXTS = {
    "t1": ["the quick brown fox jumps over the lazy dog {i}", "hello world this is a test {i}"],
    "t2": ["pruning makes language models smaller {i}", "the lazy dog sleeps {i}"],
}


@pytest.fixture
def sources(tmp_path):
    """Two text sources and one instruction source as files (distinct rows, so the partition is real)."""
    paths = {}
    for name, pats in TEXTS.items():
        p = tmp_path / f"{name}.txt"
        p.write_text("\n".join(pats[i % 2].format(i=i) for i in range(80)) + "\n")
        paths[name] = str(p)
    words = ["quick", "brown", "lazy", "small", "hello", "world", "test", "fox"]
    recs = [{"instruction": f"say {w} {i}", "input": "", "output": f"the {w} fox"} for i in range(40)
            for w in words[i % 8: i % 8 + 1]]
    p = tmp_path / "inst.json"
    p.write_text(json.dumps(recs))
    paths["inst"] = str(p)
    return paths


def _setup(tok, paths, **dyn):
    phases = [[paths["t1"], paths["t2"]], [paths["inst"]]]
    cfg = DynamicConfig(phases=phases, heldout_windows=2, heldout_seqlen=16, heldout_examples=6,
                        **{"round_steps": 2, "floor": 0.2, **dyn})
    train, heldout, reserved = build_sources(tok, phases, seqlen=32, heldout_windows=cfg.heldout_windows,
                                             heldout_seqlen=cfg.heldout_seqlen, heldout_examples=cfg.heldout_examples,
                                             reserve={paths["t1"]: {"calib": 40}}, seed=0)
    return cfg, train, heldout, reserved


def _peft(seed: int = 0, dropout: float = 0.0):
    from accelerate.utils import set_seed
    from peft import get_peft_model

    from shearkit.recovery.lora import lora_config

    model = make_tiny("llama")
    set_seed(seed)
    return get_peft_model(model, lora_config(model, 8, 16.0, dropout, None))


def _train_cfg(**kw) -> RecoverConfig:
    return RecoverConfig(**{**dict(data="mixture", steps=8, batch_size=2, seqlen=32, lr=5e-3, warmup=0,
                                   dropout=0.0), **kw})


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_build_sources_cuts_disjoint_slices(chat_tok, sources):
    cfg, train, heldout, reserved = _setup(chat_tok, sources)
    t1, t2, inst = sources["t1"], sources["t2"], sources["inst"]
    assert list(train.ranges) == [t1, t2, inst] and train.data.mode == "mixed"
    assert heldout[t1].shape == heldout[t2].shape == (2, 16)
    assert isinstance(heldout[inst], TrainData) and len(heldout[inst]) == 6
    assert set(reserved) == {t1, t2, inst} and set(reserved[t1]) == {"calib"}
    # the rows of the reserved part, the held-out windows and the training windows never meet
    calib_rows = set(reserved[t1]["calib"].rows)
    for i in range(*train.ranges[t1]):
        text = chat_tok.decode(train.data.input_ids[i])
        assert not any(r.strip() in text for r in calib_rows if len(r.strip()) > 40)
    held_prompts = {tuple(x) for x in heldout[inst].input_ids}
    assert not held_prompts & {tuple(train.data.input_ids[i]) for i in range(*train.ranges[inst])}
    part = train.records[t1]["partition"]
    assert part["heldout"] == "2 windows x 16 tokens" and set(part["parts"]) == {"calib", "heldout", "rest"}
    with pytest.raises(ShearkitError, match="heldout"):
        build_sources(chat_tok, [[t1]], seqlen=16, heldout_windows=2, heldout_seqlen=16, heldout_examples=2,
                      reserve={t1: {"heldout": 10}})


def test_weights_move_toward_the_more_degraded_source(chat_tok, sources, tmp_path):
    cfg, train, heldout, _ = _setup(chat_tok, sources, tolerance=0.0)
    t1, t2, inst = sources["t1"], sources["t2"], sources["inst"]
    model = _peft()
    dense = dense_reference(model, chat_tok, heldout)  # B = 0: the model as it is
    assert set(dense) == {t1, t2, inst} and all(v > 1 for v in dense.values())
    dense[t2] /= 2  # pretend pruning doubled t2's perplexity and left t1's alone
    h = dynamic_recover(model, chat_tok, _train_cfg(steps=4), cfg, train=train, heldout=heldout, dense=dense,
                        root=tmp_path / "dyn")
    first = h["rounds"][0]
    assert first["step"] == 0 and first["phase"] == 0 and first["loss"] is None
    assert first["degradation"][t1] == pytest.approx(0.0, abs=1e-9) and first["degradation"][t2] == pytest.approx(1.0)
    assert first["weights"][t2] > first["weights"][t1] == pytest.approx(cfg.floor / 2)
    assert first["weights"][inst] == 0.0  # not in this phase
    drawn = h["mixture"]["drawn"]
    assert drawn[t2] > drawn[t1] and drawn[inst] == 0
    # one record per round end, each with the round's mean training loss
    assert [r["step"] for r in h["rounds"]] == [0, 2, 4]
    assert h["rounds"][1]["loss"] == pytest.approx(sum(h["losses"][:2]) / 2)
    assert h["rounds"][1]["phase_ppl"] == pytest.approx(pooled_ppl(
        {s: (h["rounds"][1]["ppl"][s], 2 * 15) for s in (t1, t2)}))
    assert (tmp_path / "dyn" / "mix.png").stat().st_size > 0
    saved = json.loads((tmp_path / "dyn" / "mix.json").read_text())
    assert saved["rounds"] == json.loads(json.dumps(h["rounds"]))


def test_phases_switch_and_training_stops_on_convergence(chat_tok, sources, tmp_path):
    """With a tolerance no improvement reaches, each phase ends after its first round: phase 0 on
    t1/t2 for 2 steps, phase 1 on the instructions for 2 steps, then a stop well before the budget;
    resuming the converged run trains no further."""
    cfg, train, heldout, _ = _setup(chat_tok, sources, tolerance=1.0)
    inst = sources["inst"]
    model = _peft()
    dense = dense_reference(model, chat_tok, heldout)
    tc = _train_cfg(steps=20, save_every=10)
    h = dynamic_recover(model, chat_tok, tc, cfg, train=train, heldout=heldout, dense=dense,
                        root=tmp_path / "dyn")
    assert h["stopped"] == "converged" and h["steps_done"] == 4 and h["mixture"]["converged"]
    assert [(r["step"], r["phase"], r.get("phase_end")) for r in h["rounds"]] == \
           [(0, 0, None), (2, 0, "converged"), (2, 1, None), (4, 1, "converged")]
    assert h["rounds"][2]["weights"] == {**{s: 0.0 for s in train.ranges}, inst: 1.0}
    sampler = MixtureSampler(train.ranges, 2, 1, 1, 0)
    sampler.load_state_dict(json.loads((tmp_path / "dyn" / "checkpoint-4" / "trainer_state.json").read_text())
                            ["sampler"])
    a, b = train.ranges[inst]
    assert all(a <= i < b for s in (2, 3) for i in sampler.indices(s, 0))  # steps 3-4 trained on instructions
    again = dynamic_recover(_peft(), chat_tok, tc, cfg, train=train, heldout=heldout, dense=dense,
                            root=tmp_path / "dyn", resume=True)
    assert again["steps_done"] == 4 and again["stopped"] == "converged" and again["resumed_from"] == 4


class StopAt(Callback):
    def __init__(self, step: int):
        self.at = step

    def on_step_end(self, trainer, step, record):
        if step == self.at:
            trainer.request_stop(f"stop at {step}")


def test_resume_gives_the_same_adapters_and_rounds(chat_tok, sources, tmp_path):
    """Stopped mid-round at step 5 (checkpointed), then resumed: the same adapters and round records
    as an uninterrupted 8-step run (which crosses the phase switch at step 4)."""
    cfg, train, heldout, _ = _setup(chat_tok, sources, tolerance=0.0, phase_steps=[4, 100])
    dense = dense_reference(_peft(), chat_tok, heldout)
    tc = _train_cfg(steps=8, save_every=3)
    full_model = _peft(dropout=0.1)  # LoRA dropout: the RNG must resume too
    full = dynamic_recover(full_model, chat_tok, tc, cfg, train=train, heldout=heldout, dense=dense,
                           root=tmp_path / "a")
    assert full["steps_done"] == 8 and {r["phase"] for r in full["rounds"]} == {0, 1}
    first = dynamic_recover(_peft(dropout=0.1), chat_tok, tc, cfg, train=train, heldout=heldout, dense=dense,
                            root=tmp_path / "b", callbacks=[StopAt(5)])
    assert first["steps_done"] == 5
    resumed_model = _peft(dropout=0.1)
    resumed = dynamic_recover(resumed_model, chat_tok, tc, cfg, train=train, heldout=heldout, dense=dense,
                              root=tmp_path / "b", resume=True)
    assert resumed["resumed_from"] == 5 and resumed["steps_done"] == 8
    assert json.loads(json.dumps(resumed["rounds"])) == json.loads(json.dumps(full["rounds"]))
    assert resumed["mixture"]["drawn"] == full["mixture"]["drawn"]
    wa, wb = _adapters(full_model), _adapters(resumed_model)
    assert wa.keys() == wb.keys() and wa
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n


def test_missing_sources_are_a_clear_error(chat_tok, sources, tmp_path):
    cfg, train, heldout, _ = _setup(chat_tok, sources)
    dense = {s: 10.0 for s in heldout}
    dense.pop(sources["inst"])
    with pytest.raises(ShearkitError, match="dense reference lacks .*inst.json"):
        dynamic_recover(_peft(), chat_tok, _train_cfg(), cfg, train=train, heldout=heldout, dense=dense,
                        root=None)


def test_instruction_heldout_scores_the_response_tokens_only(chat_tok, sources):
    """The held-out perplexity of instruction examples is that of their labelled (response) tokens."""
    from shearkit.recovery.data import IGNORE, collate
    from shearkit.recovery.dynamic import source_nll

    _, _, heldout, _ = _setup(chat_tok, sources)
    held = heldout[sources["inst"]]
    model = make_tiny("llama")
    nll, n = source_nll(model, held, pad=0, batch_size=2)
    total, count = 0.0, 0
    for i in range(len(held)):  # one unpadded example at a time
        b = collate(held, [i], pad=0)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=b["input_ids"]).logits[0, :-1].float(), -1)
        for t, y in enumerate(b["labels"][0, 1:].tolist()):
            if y != IGNORE:
                total -= float(logp[t, y])
                count += 1
    assert n == count == sum(sum(t != IGNORE for t in lab[1:]) for lab in held.labels) > 0
    assert count < sum(len(x) - 1 for x in held.input_ids)  # prompts are not scored
    assert nll == pytest.approx(total, rel=1e-5)


def test_real_sources_with_reserved_parts(tiny_tokenizer, data_dir):
    """The local c4 and alpaca cut as the LoRAShear pipeline asks: a calibration part reserved, held-out
    slices, the rest for training; sizes stated in the record."""
    train, heldout, reserved = build_sources(tiny_tokenizer, [["c4"], ["alpaca"]], seqlen=512, heldout_windows=4,
                                             heldout_seqlen=64, heldout_examples=16, reserve={"c4": {"calib": 2048}},
                                             seed=0, data_dir=data_dir)
    assert list(train.ranges) == ["c4", "alpaca"] and train.data.mode == "mixed"
    assert heldout["c4"].shape == (4, 64) and 0 < len(heldout["alpaca"]) <= 16
    assert reserved["c4"]["calib"].record["tokens"] >= 2048 and reserved["alpaca"] == {}
    rec = train.records["c4"]["partition"]
    assert rec["heldout"] == "4 windows x 64 tokens" and set(rec["parts"]) == {"calib", "heldout", "rest"}
    assert train.records["alpaca"]["partition"]["parts"]["heldout"] == "16 records"
