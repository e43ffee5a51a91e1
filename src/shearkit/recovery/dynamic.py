"""Dynamic knowledge recovery (LoRAShear Alg. 5): LoRA fine-tuning on a mixture of sources whose
weights follow what pruning cost each of them.

Sources are trained in phases (by default the pretraining-style sets `c4` and `wiki`, then the
instruction set `alpaca`). At the start of training and after every round of `round_steps`
optimizer steps, `DynamicMix` measures each source of the current phase on its own held-out slice
(text: perplexity of held-out windows; instructions: perplexity of the response tokens of
held-out examples) and its degradation, the relative perplexity increase over the dense model
(clipped at 0). The next round draws from the phase's sources with weights proportional to the
degradation, mixed with a uniform floor (`mix_weights`): every source of the phase keeps at least
`floor / len(phase)` of the mix, so little-degraded sources are still seen (the paper's guard
against over-fitting the rest). When the phase's held-out perplexity (token-weighted over its
sources) improves by less than `tolerance` (relative) over its previous measurement, the next
phase starts; after the last one converges training stops. Held-out, calibration and training
slices are disjoint by construction (`build_sources`, `data.partition`).

Everything `DynamicMix` decides is in its checkpointed state and in the sampler's table of rounds,
so a killed run resumes to the same adapters and round records as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ShearkitError
from .config import RecoverConfig
from .data import IGNORE, TrainData, collate, instruction_examples, pad_id, resolve_mode, text_examples
from .dynamic_config import DynamicConfig
from .loop import Callback, Trainer
from .mixture import MixtureData, MixtureSampler

HELDOUT, REST = "heldout", "rest"
__all__ = ["DynamicConfig", "DynamicMix", "build_sources", "dense_reference", "dynamic_recover", "mix_weights"]


def mix_weights(degradation: dict[str, float], floor: float) -> dict[str, float]:
    """Weights summing to 1: `(1 - floor)` split in proportion to each source's degradation (clipped
    at 0) plus `floor` split evenly; uniform when nothing degraded."""
    if not degradation:
        raise ShearkitError("mix_weights needs at least one source.")
    if not 0.0 <= floor <= 1.0:
        raise ShearkitError(f"The mixture floor must be in [0, 1], got {floor}.")
    d = {k: max(0.0, float(v)) if math.isfinite(v) else 0.0 for k, v in degradation.items()}
    total, n = sum(d.values()), len(d)
    if total <= 0:
        return {k: 1.0 / n for k in d}
    return {k: (1.0 - floor) * v / total + floor / n for k, v in d.items()}


# -- held-out measurement -----------------------------------------------------------------------------

def _response_nll(model, data: TrainData, pad: int, batch_size: int) -> tuple[float, int]:
    """(summed NLL, tokens) of the labelled (response) tokens of instruction examples."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(data), batch_size):
            b = collate(data, list(range(i, min(i + batch_size, len(data)))), pad)
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                           use_cache=False).logits.float()
            labels = b["labels"][:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=IGNORE, reduction="sum")
            total += float(nll)
            count += int((labels != IGNORE).sum())
    return total, count


def source_nll(model, held: torch.Tensor | TrainData, pad: int = 0, batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL, predicted tokens) of one source's held-out slice: text windows (each scored on its own,
    as `analysis.sensitivity.heldout_ppl`) or instruction examples (response tokens only)."""
    if isinstance(held, TrainData):
        return _response_nll(model, held, pad, batch_size)
    if torch.is_tensor(held) and held.dim() == 2:
        from ..analysis.sensitivity import heldout_ppl

        tokens = held.shape[0] * (held.shape[1] - 1)
        return math.log(heldout_ppl(model, held)) * tokens, tokens
    raise ShearkitError(f"A held-out slice is a (windows, seqlen) LongTensor or instruction TrainData, got "
                        f"{type(held).__name__}.")


def measure(model, heldout: dict[str, Any], sources: Sequence[str], pad: int = 0,
            batch_size: int = 8) -> dict[str, tuple[float, int]]:
    """{source: (perplexity, tokens)} of `model` on the held-out slices of `sources` (in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        for s in sources:
            nll, n = source_nll(model, heldout[s], pad, batch_size)
            out[s] = (math.exp(nll / max(n, 1)), n)
        return out
    finally:
        model.train(was_training)


def dense_reference(model, tokenizer, heldout: dict[str, object]) -> dict[str, float]:
    """Per-source held-out perplexity of the DENSE model (measure before pruning): the reference the
    degradation is taken against."""
    return {s: ppl for s, (ppl, _) in measure(model, heldout, list(heldout), pad_id(tokenizer)).items()}


def pooled_ppl(values: dict[str, tuple[float, int]]) -> float:
    """Token-weighted perplexity over several sources (exp of the mean NLL over all their tokens)."""
    tokens = sum(n for _, n in values.values())
    return math.exp(sum(math.log(p) * n for p, n in values.values()) / max(tokens, 1))


# -- the callback ---------------------------------------------------------------------------------------

class DynamicMix(Callback):
    """Re-weights `sampler` at every round from the held-out degradation; switches phases and stops on
    convergence (see the module docstring). `rounds` holds one record per measurement."""

    name = "dynamic_mix"

    def __init__(self, cfg: DynamicConfig, sampler: MixtureSampler, heldout: dict[str, Any], dense: dict[str, float],
                 pad: int = 0):
        self.cfg, self.sampler, self.heldout, self.dense, self.pad = cfg, sampler, heldout, dense, pad
        self.phase = 0
        self.phase_start = 0  # step the current phase began after
        self.rounds: list[dict] = []
        self.best: dict[str, float] = {}  # phase index -> lowest phase perplexity measured
        self.last: float | None = None  # the current phase's previous measurement
        self.loss_sum, self.loss_n = 0.0, 0
        self.done: str | None = None  # why the last phase ended (training stops), once it has

    def _sources(self) -> list[str]:
        return list(self.cfg.phases[self.phase])

    def _measure(self, trainer: Trainer) -> dict[str, tuple[float, int]]:
        """Measured on the main process and shared, so every process sets the same weights."""
        acc = trainer.acc
        values = measure(trainer.model, self.heldout, self._sources(), self.pad, self.cfg.eval_batch_size) \
            if acc.is_main_process else None
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            values = broadcast_object_list([values])[0]
        return values

    def _record(self, trainer: Trainer, step: int, loss: float | None) -> dict:
        """Measure the phase's sources at `step` and append the round record (weights not yet set)."""
        values = self._measure(trainer)
        ppl = {s: p for s, (p, _) in values.items()}
        degradation = {s: max(0.0, p / self.dense[s] - 1.0) for s, p in ppl.items()}
        phase_ppl = pooled_ppl(values)
        improvement = None if self.last is None else (self.last - phase_ppl) / self.last
        key = str(self.phase)
        self.best[key] = min(self.best.get(key, math.inf), phase_ppl)
        rec = {"round": len(self.rounds), "step": step, "phase": self.phase, "sources": self._sources(),
               "ppl": ppl, "dense_ppl": {s: self.dense[s] for s in ppl}, "degradation": degradation,
               "phase_ppl": phase_ppl, "improvement": improvement, "loss": loss, "weights": None,
               "converged": False}
        self.rounds.append(rec)
        self.last = phase_ppl
        return rec

    def _start_round(self, rec: dict, step: int) -> None:
        degradation = rec["degradation"] if self.cfg.adaptive else {s: 0.0 for s in rec["degradation"]}
        weights = mix_weights(degradation, self.cfg.floor)  # all zero: equal shares
        self.sampler.set_weights(step, weights)
        rec["weights"] = {s: weights.get(s, 0.0) for s in self.sampler.sources}

    def _start_phase(self, trainer: Trainer, step: int) -> None:
        self.last, self.phase_start = None, step
        self._start_round(self._record(trainer, step, None), step)

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.done:  # a resumed run whose last phase had already ended trains no further
            trainer.request_stop(self.done)
        elif not self.rounds:
            self._start_phase(trainer, 0)

    def on_step_end(self, trainer: Trainer, step: int, record: dict) -> None:
        self.loss_sum += float(record["loss"])
        self.loss_n += 1
        record["mix_phase"] = self.phase
        last_step = step >= trainer.config.steps
        if step % self.cfg.round_steps and not last_step:
            return
        loss, self.loss_sum, self.loss_n = self.loss_sum / self.loss_n, 0.0, 0
        rec = self._record(trainer, step, loss)
        if last_step:
            return
        converged = rec["improvement"] is not None and rec["improvement"] < self.cfg.tolerance
        capped = self.cfg.phase_steps is not None and step - self.phase_start >= self.cfg.phase_steps[self.phase]
        if not (converged or capped):
            self._start_round(rec, step)
            return
        rec["converged"] = converged
        rec["phase_end"] = "converged" if converged else "phase_steps"
        if self.phase + 1 < len(self.cfg.phases):
            self.phase += 1
            self._start_phase(trainer, step)
        else:
            self.done = rec["phase_end"]
            trainer.request_stop(self.done)

    def on_train_end(self, trainer: Trainer, history: dict) -> None:
        if trainer.root is not None and trainer.acc.is_main_process and self.rounds:
            from ..io.atomic import write_json

            write_json(trainer.root / "mix.json", {"config": self.cfg.to_dict(), "dense_ppl": self.dense,
                                                   "rounds": self.rounds})
            plot_mix(self.rounds, trainer.root / "mix.png")

    def state_dict(self) -> dict:
        return {"phase": self.phase, "phase_start": self.phase_start, "rounds": self.rounds, "best": self.best,
                "last": self.last, "loss_sum": self.loss_sum, "loss_n": self.loss_n, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.phase, self.phase_start = int(state["phase"]), int(state["phase_start"])
        self.rounds, self.best = list(state["rounds"]), dict(state["best"])
        self.last, self.loss_sum, self.loss_n = state["last"], float(state["loss_sum"]), int(state["loss_n"])
        self.done = state["done"]


def plot_mix(rounds: list[dict], path: str | os.PathLike) -> None:
    """Per round: the mixture weights, held-out perplexity relative to the dense model, and the round's
    mean training loss; a dashed line where a phase ends."""
    from ..io.atomic import atomic_file
    from ..report.plots import _figure, _short

    fig = _figure(8.0, 7.0)
    top, middle, bottom = fig.subplots(3, 1, sharex=True, height_ratios=[3, 3, 2])
    sources = list(dict.fromkeys(s for r in rounds for s in r["ppl"]))
    colors = {s: f"C{i}" for i, s in enumerate(sources)}
    set_at = [r for r in rounds if r["weights"]]
    last_step = rounds[-1]["step"]
    for s in sources:
        xs, ys = [], []
        for r, nxt in zip(set_at, set_at[1:] + [None]):
            xs += [r["step"], nxt["step"] if nxt else last_step]
            ys += [r["weights"].get(s, 0.0)] * 2
        top.plot(xs, ys, color=colors[s], lw=1.5, label=_short(s))
        pts = [(r["step"], r["ppl"][s] / r["dense_ppl"][s]) for r in rounds if s in r["ppl"]]
        middle.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=colors[s])
    losses = [(r["step"], r["loss"]) for r in rounds if r["loss"] is not None]
    bottom.plot([p[0] for p in losses], [p[1] for p in losses], "s-", ms=3, color="#333333")
    for r in rounds:
        if r.get("phase_end"):
            for ax in (top, middle, bottom):
                ax.axvline(r["step"], color="#888888", ls="--", lw=1)
    top.set_ylabel("mixture weight")
    top.set_ylim(0, 1.02)
    top.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    middle.axhline(1.0, color="#555555", lw=0.8)
    middle.set_ylabel("held-out ppl / dense")
    bottom.set_ylabel("round's train loss")
    bottom.set_xlabel("optimizer step (dashed: a phase ends)")
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
    top.set_title("dynamic knowledge recovery: mixture weights, held-out perplexity and loss per round", fontsize=10)
    with atomic_file(path) as tmp:
        fig.savefig(tmp)


# -- entry points ----------------------------------------------------------------------------------------

def _check_sources(cfg: DynamicConfig, train: MixtureData, heldout: dict, dense: dict) -> None:
    for what, have in (("training mixture", train.ranges), ("held-out slices", heldout),
                       ("dense reference", dense)):
        missing = [s for p in cfg.phases for s in p if s not in have]
        if missing:
            raise ShearkitError(f"dynamic recovery: the {what} lacks {', '.join(missing)} (phases "
                                f"{cfg.phases}); build them with build_sources over the same phases.")
    bad = {s: v for s, v in dense.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    if bad:
        raise ShearkitError(f"dynamic recovery: dense reference perplexities must be finite and positive, got {bad}.")


def dynamic_recover(model, tokenizer, train_config: RecoverConfig, cfg: DynamicConfig, *, train: MixtureData,
                    heldout: dict[str, object], dense: dict[str, float], root: Path | None, resume: bool = False,
                    callbacks: Sequence[Callback] = (), desc: str = "dynamic recovery", optimizer="adamw",
                    data_dir=None) -> dict:
    """Train `model` (a peft model with LoRA attached) for at most `train_config.steps` steps on the
    dynamically weighted mixture `train`; returns the Trainer's history plus "rounds" (one record per
    held-out measurement) and "mixture" (config, sources, examples drawn per source)."""
    from .sampling import process_count

    _check_sources(cfg, train, heldout, dense)
    sampler = MixtureSampler(train.ranges, train_config.batch_size, train_config.grad_accum, process_count(model),
                             train_config.seed)
    mix = DynamicMix(cfg, sampler, heldout, dense, pad_id(tokenizer))
    trainer = Trainer(model, tokenizer, train.data, train_config, sampler=sampler, root=root,
                      callbacks=[mix, *callbacks], desc=desc, optimizer=optimizer, data_dir=data_dir)
    history = trainer.fit(resume=resume)
    history["rounds"] = mix.rounds
    history["mixture"] = {"config": cfg.to_dict(), "dense_ppl": dict(dense), "sources": train.records,
                          "drawn": sampler.drawn(trainer.step), "phase_reached": mix.phase,
                          "best_phase_ppl": dict(mix.best), "converged": mix.done == "converged"}
    if root is not None and trainer.acc.is_main_process and mix.rounds:
        base = Path(root).parent
        history["mix_plot"] = (Path(root) / "mix.png").relative_to(base).as_posix()
    return history


def build_sources(tokenizer, phases: Sequence[Sequence[str]], *, seqlen: int, heldout_windows: int,
                  heldout_seqlen: int, heldout_examples: int, reserve: dict[str, dict[str, int]] | None = None,
                  seed: int = 0, data_dir=None,
                  train_examples: int | None = None) -> tuple[MixtureData, dict[str, object], dict[str, dict]]:
    """Cut every source into disjoint slices: extra `reserve` parts (tokens for text sets, records for
    instruction sets; e.g. {"wiki": {"analysis": 4096}}), a held-out slice, and the training rest.

    `train_examples` caps each source's training rest at that many examples (windows of `seqlen`,
    or records): the most a budget can draw from one source; None keeps every row left over.
    Returns (training mixture, {source: held-out windows or instruction examples}, {source: {part:
    TextRows or records}}). A reserved source need not be trained on.
    """
    from ..data.partition import partition_records, partition_rows, windows

    reserve = dict(reserve or {})
    clash = {s: sorted({HELDOUT, REST} & set(p)) for s, p in reserve.items() if {HELDOUT, REST} & set(p)}
    if clash:
        raise ShearkitError(f"Reserved parts cannot be named '{HELDOUT}' or '{REST}' (used for {clash}).")
    sources = list(dict.fromkeys([s for p in phases for s in p] + list(reserve)))
    trained = {s for p in phases for s in p}
    train: dict[str, TrainData] = {}
    heldout: dict[str, object] = {}
    reserved: dict[str, dict] = {}
    for s in sources:
        extra = dict(reserve.get(s, {}))
        if resolve_mode(s) == "instruction":
            parts = partition_records(s, {**extra, HELDOUT: heldout_examples, REST: 1}, seed=seed, data_dir=data_dir,
                                      rest_limit=train_examples)
            held = instruction_examples(tokenizer, parts[HELDOUT], seqlen, s)
            rest = instruction_examples(tokenizer, parts[REST], seqlen, s) if s in trained else None
            sizes = {k: f"{len(v)} records" for k, v in parts.items()}
        else:
            parts = partition_rows(tokenizer, s, {**extra, HELDOUT: heldout_windows * heldout_seqlen, REST: seqlen},
                                   seed=seed, data_dir=data_dir,
                                   rest_limit=None if train_examples is None else train_examples * seqlen)
            held = windows(tokenizer, parts[HELDOUT], heldout_windows, heldout_seqlen)
            rest = text_examples(tokenizer, parts[REST], seqlen) if s in trained else None
            sizes = {k: f"{v.record['tokens']:,} tokens in {v.record['rows']} rows" for k, v in parts.items()}
        reserved[s] = {k: parts[k] for k in extra}
        if s in trained:
            heldout[s] = held
            rest.record["partition"] = {"seed": seed, "parts": sizes,
                                        "heldout": (f"{held.shape[0]} windows x {held.shape[1]} tokens"
                                                    if torch.is_tensor(held) else f"{len(held)} examples")}
            train[s] = rest
    return MixtureData.join(train), heldout, reserved
