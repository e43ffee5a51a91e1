"""The one training loop (`Trainer`): peft adapters, accelerate for devices and accumulation,
and `Callback`s at the points methods that prune while they train need.

The same loop runs on CPU, one GPU, or several GPUs under `accelerate launch` (each process
takes its own slice of every step's examples; losses are reduced across processes).

Lifecycle of one optimizer step `s` (1-based):
1. `grad_accum` micro-batches, each loss = (summed token loss) / (label tokens of the whole
   step), so accumulating 2 x 1 sequences equals 1 x 2 sequences (which is also why a step that
   runs out of memory can run again with each micro-batch split in halves: `_forward_backward`);
2. gradient unscale and clipping; a NaN/inf loss or gradient, or a loss above `divergence` x
   the best smoothed loss for `divergence_patience` steps, stops training and restores the last
   adapter weights whose loss was finite and in range (`history["stop_message"]` names the step
   and what to change; no checkpoint is written after it, so the earlier ones stay as they were);
3. `on_before_optimizer_step` (every trainable parameter's `.grad` holds the clipped gradient);
4. optimizer and scheduler step, `zero_grad`; `on_step_end` (may add keys to the step's record);
5. evaluation (`on_evaluate`), logging, checkpoint (`on_checkpoint`) at their intervals; a
   callback's `trainer.request_stop(reason)` ends training after this step.
Trainable weights that are not finite (an overflowing update, a callback's write) are caught
before a checkpoint is written and after the last step, and stop training as a NaN loss does:
neither a checkpoint nor the returned model ever holds them.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.lm_head import chunked_ce, label_hidden, split_head
from ..arch.modules import set_activation_checkpointing, unwrap
from ..batching import Backoff, chunks
from ..errors import ShearkitError
from ..plan import base_fingerprint
from .checkpoint import (latest_checkpoint, load_checkpoint, rank_rng_state, ranks_rng_state, rng_state,
                         save_checkpoint, set_rng_state)
from .config import RecoverConfig
from .data import IGNORE, TrainData, collate, pad_id
from .guard import STOPS, DivergenceGuard, diverged
from .optimizers import OptimizerFactory, build_optimizer
from .sampling import Sampler, StepSampler
from .trainlog import TrainLog, plot_losses

logger = logging.getLogger(__name__)
SCHEDULE_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
_OTHER = "trainable."  # checkpoint key prefix of trainable parameters that are not LoRA factors
# settings that must not change between a checkpoint and the run resuming from it
RESUME_KEYS = ("steps", "data", "mode", "seqlen", "batch_size", "grad_accum", "lr", "schedule", "warmup", "rank",
               "alpha", "dropout", "target_modules", "seed", "weight_decay", "distill_weight")


class Callback:
    """Hooks into training; every method is optional. `name` keys its checkpoint state (default: class name)."""

    name: str = "Callback"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def on_train_begin(self, trainer: Trainer) -> None:
        """Once per `fit`, after a resume has restored every state, before the first step."""

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        """After the step's backward passes, gradient unscale and clipping, before `optimizer.step()`:
        every trainable parameter's `.grad` holds the step's (clipped) gradient."""

    def on_step_end(self, trainer: Trainer, step: int, record: dict) -> None:
        """After `optimizer.step()`, `scheduler.step()` and `zero_grad()`; keys added to `record` are logged."""

    def on_evaluate(self, trainer: Trainer, step: int, results: dict) -> None:
        """After an evaluation (`results`: set -> perplexity; empty on processes other than the main one)."""

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        """After `path` (checkpoint-<step>, holding this callback's `state_dict()`) was written."""

    def on_train_end(self, trainer: Trainer, history: dict) -> None:
        """Once at the end of `fit` (also after a stop), with the finished history."""

    def state_dict(self) -> dict:
        """State to checkpoint: tensors and JSON-able values (tensors come back on the CPU)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (called on resume, before `on_train_begin`)."""


def train_summary(history: dict, *extra: str) -> dict:
    """What a plan or a run record keeps of a `fit` history: steps, losses, time, budget and the stop
    reason (plus the `extra` keys); after a NaN/divergence stop also its step, the step whose weights
    were kept, and the message saying what to change."""
    out = {k: history.get(k) for k in ("steps_done", "loss_first", "loss_last", "time_s", "budget", "stopped", *extra)}
    if diverged(history):
        out.update({k: history.get(k) for k in ("stopped_at", "restored_to_step", "stop_message")})
    return out


def _is_peft(model) -> bool:
    """True for a peft wrapper (the Trainer also trains a plain model's unfrozen parameters)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def check_teacher(model, teacher, cfg: RecoverConfig):
    """The teacher to distil from (None when not distilling); a clear error when it is missing or mismatched."""
    if cfg.distill_weight > 0 and teacher is None:
        raise ShearkitError("recover.distill_weight > 0 needs a dense teacher model: pass teacher= (CLI: --teacher).")
    if teacher is None or cfg.distill_weight == 0:
        return None
    v_s = model.get_output_embeddings().weight.shape[0]
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if v_s != v_t:
        raise ShearkitError(f"The teacher's vocabulary ({v_t}) differs from the model's ({v_s}); distil from the "
                            "dense model the pruned one came from.")
    return teacher


def refuse_stale(root: Path | None, resume: bool) -> None:
    """A fresh run must not mix its checkpoints with an earlier run's in `root`."""
    if root is not None and not resume and latest_checkpoint(root) is not None:
        raise ShearkitError(f"{root} already holds checkpoints of an earlier run; pass resume=True (CLI: --resume) "
                            "to continue it, or choose another output directory.")


def selects_logits(model) -> bool:
    """Whether `model(..., logits_to_keep=<(batch, seq) bool mask>)` computes the vocabulary logits of
    the masked positions only (transformers' `slice_logits_to_keep`; 5.0 took positions, not masks)."""
    import inspect

    from transformers import modeling_utils

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (hasattr(modeling_utils, "slice_logits_to_keep")
            and "logits_to_keep" in inspect.signature(base.forward).parameters)


def _label_logits(model, batch: dict, keep: torch.Tensor, select: bool) -> torch.Tensor:
    """(positions with a label, vocab) float logits: with `select`, the output head runs on those
    positions only (prompt and padding positions never reach it), else every logit is formed."""
    kw = {"logits_to_keep": keep} if select else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **kw).logits
    return (logits if select else logits[keep]).float()  # .float(): a no-op in float32


def _step_loss(model, batch: dict, n_label: int, teacher, cfg: RecoverConfig,
               select: tuple[bool, bool] = (False, False), chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, summed CE) of one micro-batch; normalised by the step's label tokens.
    `select`: (student, teacher) compute logits only where a label is (`selects_logits`);
    `chunk` > 0 (no teacher): the output head runs that many label tokens at a time (`arch.lm_head`)."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t + 1
    targets = labels[:, 1:][keep[:, :-1]]
    parts = split_head(model) if chunk > 0 and teacher is None else None
    if parts is not None:
        ce = chunked_ce(parts[1], label_hidden(parts[0], batch["input_ids"], keep, batch["attention_mask"]),
                        targets, chunk)
        return ce / max(n_label, 1), ce.detach()
    student = _label_logits(model, batch, keep, select[0])
    ce = F.cross_entropy(student, targets, reduction="sum")
    loss = ce
    if teacher is not None and cfg.distill_weight > 0:
        with torch.no_grad():
            t_logits = _label_logits(teacher, batch, keep, select[1])
        temp = cfg.distill_temperature
        t_logp = F.log_softmax(t_logits / temp, dim=-1)
        s_logp = F.log_softmax(student / temp, dim=-1)
        kd = (t_logp.exp() * (t_logp - s_logp)).sum() * temp * temp  # KL(teacher || student), Hinton scaling
        loss = (1 - cfg.distill_weight) * ce + cfg.distill_weight * kd
    return loss / max(n_label, 1), ce.detach()


def _evaluate(model, tokenizer, cfg: RecoverConfig, data_dir) -> dict[str, float]:
    """Perplexity of each eval set (quick: `eval_limit` windows), in eval mode."""
    from ..eval.perplexity import perplexity

    model.eval()
    try:
        return {t: perplexity(model, tokenizer, t, seqlen=cfg.eval_seqlen or cfg.seqlen, limit=cfg.eval_limit,
                              data_dir=data_dir)["ppl"] for t in cfg.eval_tasks}
    finally:
        model.train()


class Trainer:
    """Trains a peft model's trainable parameters for `config.steps` optimizer steps (see the module docstring).

    Public attributes callbacks may use: `model` (peft), `params` (trainable parameters),
    `named_params` (name -> parameter), `optimizer`, `scheduler`, `acc` (accelerate.Accelerator),
    `sampler`, `step` (last completed step), `config`, `history`.
    """

    def __init__(self, model, tokenizer, train: TrainData, config: RecoverConfig, *,
                 callbacks: Sequence[Callback] = (), optimizer: Union[str, OptimizerFactory] = "adamw",
                 sampler: Sampler | None = None, root: Path | None = None, teacher=None,
                 data_dir=None, desc: str = "train", resume_keys: Sequence[str] = RESUME_KEYS):
        """`model`: a peft model with its adapters attached, or a plain model with some parameters
        unfrozen (trainable = parameters with requires_grad);
        `root`: folder for train_log.jsonl, loss.png and checkpoint-<step>/ (None: nothing written)."""
        from accelerate import Accelerator
        from transformers import get_scheduler

        names = [cb.name for cb in callbacks]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ShearkitError(f"Callbacks need distinct names (they key the checkpoint state); "
                                f"{', '.join(dup)} appears more than once: set `name` on each.")
        self.model, self.tokenizer, self.train_data, self.config = model, tokenizer, train, config
        self.callbacks = list(callbacks)
        self.root = Path(root) if root is not None else None
        self.data_dir = data_dir or config.data_dir
        self.desc, self.resume_keys = desc, tuple(resume_keys)
        self.teacher = check_teacher(model, teacher, config)
        self.named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.named_params:
            raise ShearkitError("The model has no trainable adapter parameters: unfreeze them (adapters loaded with "
                                "PeftModel.from_pretrained need is_trainable=True), or pass the base model to "
                                "get new adapters.")
        self.params = list(self.named_params.values())
        self.base_fingerprint = base_fingerprint(model)
        device = next(model.parameters()).device
        self.acc = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=device.type == "cpu")
        optim = build_optimizer(optimizer, self.params, config)
        self.optimizer_class = type(optim).__name__
        self.scheduler = get_scheduler(SCHEDULE_NAMES[config.schedule], optim, num_warmup_steps=config.warmup_steps,
                                       num_training_steps=config.steps)
        self.wrapped, self.optimizer = self.acc.prepare(model, optim)
        if self.acc.process_index > 0:  # each process its own dropout masks, as the rows of one batch get;
            torch.manual_seed(torch.initial_seed() + self.acc.process_index)  # the main keeps one process's stream
        if self.teacher is not None:
            self.teacher.to(self.acc.device).eval()
        # logits of labelled positions only: the full (batch, seq, vocab) tensor is never formed
        self._select = (selects_logits(model), self.teacher is not None and selects_logits(self.teacher))
        # the chunked head calls the base model directly, past any DDP wrapper: one process only
        self._chunk = config.loss_chunk if self.wrapped is model else 0
        self.sampler: Sampler = sampler if sampler is not None else StepSampler(
            len(train), config.batch_size, config.grad_accum, self.acc.num_processes, config.seed)
        self.guard = DivergenceGuard(config.divergence, config.divergence_patience)
        # sequences per forward pass: batch_size, halved when a step runs out of memory (`_forward_backward`)
        self.backoff = Backoff(config.batch_size, desc)
        self.step = 0
        self.tokens_seen = self.label_tokens = 0
        self.history: dict[str, Any] = {}
        self._stop: str | None = None
        self._eval_time = 0.0

    # -- control ---------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """End training cleanly after the current step (checkpointed when checkpoints are on)."""
        self._stop = str(reason)

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- one step ----------------------------------------------------------------------------------

    def _forward_backward(self, step: int, pad: int, label_counts: list[int]) -> tuple[float, float | None, int, int]:
        """Accumulate the gradients of one optimizer step (0-based `step`) on this process.

        Returns (mean loss of the step over all processes, mean CE when distilling else None,
        label tokens of the step, input tokens of the step).

        A step that runs out of memory (one process only) is run again from its start with each
        micro-batch split in halves (`self.backoff`): the step's sequences, their order and the
        normalisation by the step's label tokens are unchanged, so the update is the same up to float
        order, as halving batch_size and doubling grad_accum would give; the sampler, the checkpoints and
        the resume settings see the configured batch_size and grad_accum throughout.
        """
        acc, cfg, sampler = self.acc, self.config, self.sampler
        # label tokens of the whole step over every process (the sampler is deterministic, so no
        # communication is needed): normalising by it makes 2 processes x 1 sequence, 1 x 2 and
        # 2 micro-batches x 1 the same update
        n_label = sum(label_counts[i] for p in range(acc.num_processes) for m in range(cfg.grad_accum)
                      for i in sampler.indices(step, m, p))
        micro = [collate(self.train_data, sampler.indices(step, m, acc.process_index), pad)
                 for m in range(cfg.grad_accum)]
        tokens = sum(int(cpu["attention_mask"].sum()) for cpu in micro)  # counted on the host: no device sync
        acc_step = acc.step

        def attempt(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
            loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
            ce_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
            for cpu in micro:
                batch = {k: v.to(acc.device, non_blocking=True) for k, v in cpu.items()}
                parts = chunks(batch["input_ids"].shape[0], rows)
                with acc.accumulate(self.wrapped):  # once per micro-batch: accelerate counts them
                    for j, (lo, hi) in enumerate(parts):
                        piece = batch if len(parts) == 1 else {k: v[lo:hi] for k, v in batch.items()}
                        # all but the last piece without a gradient all-reduce (several processes)
                        with acc.no_sync(self.wrapped) if j < len(parts) - 1 else nullcontext():
                            loss, ce = _step_loss(self.wrapped, piece, n_label, self.teacher, cfg, self._select,
                                                  self._chunk)
                            # accelerate divides by grad_accum and DDP averages over processes; undo both,
                            # since the loss is already this process's share of the step's mean
                            acc.backward(loss * cfg.grad_accum * acc.num_processes)
                        loss_sum += loss.detach().double()
                        ce_sum += ce.double()
            return loss_sum, ce_sum

        def undo() -> None:  # the failed attempt's partial gradients and accelerate's micro-batch count
            for p in self.params:
                p.grad = None
            acc.step = acc_step

        if acc.num_processes > 1:  # every process would have to back off together: not attempted
            loss_sum, ce_sum = attempt(self.backoff.size)
        else:
            loss_sum, ce_sum = self.backoff.retry(attempt, undo)
        sums = acc.reduce(torch.stack([loss_sum, ce_sum, torch.tensor(float(tokens), device=acc.device,
                                                                      dtype=torch.float64)]), "sum")
        ce_mean = float(sums[1]) / max(n_label, 1) if self.teacher is not None else None
        return float(sums[0]), ce_mean, n_label, int(sums[2])

    # -- evaluation, checkpoints ---------------------------------------------------------------------

    def evaluate(self, step: int | str) -> dict[str, float]:
        """Perplexity on `config.eval_tasks` (main process), recorded in `history["eval"][step]`."""
        t = time.perf_counter()
        res: dict[str, float] = {}
        if self.acc.is_main_process:
            res = _evaluate(self.model, self.tokenizer, self.config, self.data_dir)
            self.history["eval"][step] = res
        self.acc.wait_for_everyone()
        self._eval_time += time.perf_counter() - t
        self._call("on_evaluate", step, res)
        return res

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The adapters (peft's names) and any other trainable parameter (e.g. norms a method unfroze,
        or the adapters of a model without peft, such as FlexiGPT's shared blocks)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model) if _is_peft(self.model) else {}
        state.update({_OTHER + n: p for n, p in self.named_params.items() if "lora_" not in n})
        return state

    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        device = self.acc.device
        if _is_peft(self.model):
            set_peft_model_state_dict(self.model, {k: v.to(device) for k, v in state.items()
                                                   if not k.startswith(_OTHER)})
        with torch.no_grad():
            for k, v in state.items():
                if k.startswith(_OTHER):
                    self.named_params[k[len(_OTHER):]].copy_(v)

    def _save(self, step: int) -> None:
        path = self.root / f"checkpoint-{step}"
        rng = None
        if self.acc.num_processes > 1:  # every process's dropout stream, gathered for the main one to keep
            from accelerate.utils import gather_object

            rng = ranks_rng_state(gather_object([rng_state()]))
        if self.acc.is_main_process:
            states = {cb.name: s for cb in self.callbacks if (s := cb.state_dict())}
            save_checkpoint(self.root, step, self._trainable_state(), self.optimizer.state_dict(), {
                "scheduler": self.scheduler.state_dict(), "guard": self.guard.state(),
                "sampler": self.sampler.state_dict(), "tokens_seen": self.tokens_seen,
                "label_tokens": self.label_tokens, "config": self.config.to_dict(),
                "base_fingerprint": self.base_fingerprint, "processes": self.acc.num_processes,
                "optimizer_class": self.optimizer_class,
                # sequences per forward pass after running out of memory: a resumed run starts there
                "micro_batch_rows": self.backoff.size,
                # the history so far: a resumed run reports the same losses and evaluations
                "losses": list(self.history.get("losses") or []),
                "eval": {str(k): v for k, v in (self.history.get("eval") or {}).items()}}, states, rng)
        self.acc.wait_for_everyone()
        self._call("on_checkpoint", step, path)

    def _restore(self, path: Path) -> None:
        """Load every state from checkpoint `path`, refusing one written under other settings."""
        ckpt = load_checkpoint(path)
        st = ckpt["state"]
        if st.get("base_fingerprint") != self.base_fingerprint:
            raise ShearkitError(f"Checkpoint {path} was made from other base weights; resume with the same model "
                                "or start a new run directory.")
        if st.get("processes", 1) != self.acc.num_processes:
            raise ShearkitError(f"Checkpoint {path} was written by {st.get('processes', 1)} process(es); resume "
                                f"with the same number (now {self.acc.num_processes}) so each step sees the same "
                                "batches.")
        now = self.config.to_dict()
        changed = [k for k in self.resume_keys if st["config"].get(k) != now.get(k)]
        if changed:
            raise ShearkitError(f"Cannot resume from {path}: recover.{', recover.'.join(changed)} changed "
                                "since it was written; use the same settings or a new run directory.")
        if st.get("optimizer_class", self.optimizer_class) != self.optimizer_class:
            raise ShearkitError(f"Checkpoint {path} was written with the {st['optimizer_class']} optimizer, this run "
                                f"uses {self.optimizer_class}; use the same optimizer or a new run directory.")
        states = ckpt["callbacks"]
        mine = {cb.name for cb in self.callbacks}
        missing = [cb.name for cb in self.callbacks if cb.name not in states and cb.state_dict()]
        extra = sorted(set(states) - mine)
        if missing or extra:
            raise ShearkitError(f"Checkpoint {path} holds the state of callbacks {extra or 'none else'} and lacks "
                                f"that of {missing or 'none'}; resume with the callbacks it was written with.")
        self._load_trainable(ckpt["adapter"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        set_rng_state(rank_rng_state(ckpt["rng"], self.acc.process_index))
        self.guard.load(st["guard"])
        self.sampler.load_state_dict(st.get("sampler", {}))
        self.backoff.size = min(self.backoff.size, int(st.get("micro_batch_rows") or self.backoff.size))
        for cb in self.callbacks:
            if cb.name in states:
                cb.load_state_dict(states[cb.name])
        self.step, self.tokens_seen, self.label_tokens = st["step"], st["tokens_seen"], st["label_tokens"]
        self._restored = {"losses": list(st.get("losses") or []),
                          "eval": {int(k) if k.isdigit() else k: v for k, v in (st.get("eval") or {}).items()}}

    # -- divergence ------------------------------------------------------------------------------------

    def _finite(self) -> bool:
        """Whether every trainable weight is finite."""
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) for p in self.params)

    def _halt(self, reason: str, step: int, what: str, loss: float | None,
              good: dict[str, torch.Tensor], good_step: int) -> None:
        """Stop on a NaN/divergence at `step`: put back the trainable weights of `good_step` and record
        the stop with a message that names the step and what to change."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in self.named_params.items():
                p.copy_(good[n])
        fixes = [f"a lower learning rate (lr, now {cfg.lr:g})",
                 f"stronger gradient clipping (max_grad_norm, now {cfg.max_grad_norm:g})" if cfg.max_grad_norm > 0
                 else "gradient clipping on (max_grad_norm, e.g. 1.0)"]
        if reason == "diverged":
            fixes.append(f"if such spikes are expected, a larger divergence (now {cfg.divergence:g}) or "
                         f"divergence_patience (now {cfg.divergence_patience})")
        msg = (f"{self.desc}: {what} at step {step} of {cfg.steps}; training stopped there and kept the trainable "
               f"weights of step {good_step}. Rerun with {', or '.join(fixes)}.")
        self.history.update(stopped=reason, stopped_at=step, stop_loss=loss, restored_to_step=good_step,
                            stop_message=msg)
        self.acc.print(msg)
        if self.acc.is_main_process and logger.hasHandlers():  # run.log, when a run directory is open
            logger.warning(msg)

    # -- the run -------------------------------------------------------------------------------------

    def _unshard(self) -> None:
        """Under FSDP, hand the model back whole: every process gathers the full parameters, each FSDP unit
        in the model is replaced by the module it wraps, and those modules get the full tensors (what
        comes next, merging LoRA, pruning or saving, needs whole weights, not this process's shards)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type != DistributedType.FSDP:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        prefix = "_fsdp_wrapped_module."
        with FSDP.summon_full_params(self.wrapped, writeback=False, rank0_only=False):
            full = {n.replace(prefix, ""): (p.detach().clone(), p.requires_grad)
                    for n, p in self.wrapped.named_parameters()}
        for parent in [self.model, *self.model.modules()]:
            for name, child in list(parent.named_children()):
                if isinstance(child, FSDP):
                    setattr(parent, name, child.module)
        for name, (tensor, grad) in full.items():
            owner, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(owner) if owner else self.model
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=grad)
        self.wrapped = self.model
        self.named_params = {n: p for n, p in self.model.named_parameters() if n in self.named_params}
        self.params = list(self.named_params.values())

    def _clip(self, max_norm: float):
        """Clip the step's gradients by their global norm and return it. Under FSDP each process holds a
        shard of every gradient: the wrapped model's own clip, which accelerate calls when it is given
        all the model's parameters, sums the shards' squared norms over the processes (the norm of the
        trainable parameters' shards alone would differ from process to process)."""
        from accelerate.utils import DistributedType

        fsdp = self.acc.distributed_type == DistributedType.FSDP
        return self.acc.clip_grad_norm_(list(self.wrapped.parameters()) if fsdp else self.params, max_norm)

    def fit(self, resume: bool = False) -> dict:
        """Run `config.steps` optimizer steps (from the newest checkpoint under `root` when `resume`);
        returns the history: losses, evaluations, stop reason, restored step, budget."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.acc
        if resume and self.root is None:
            raise ShearkitError("resume=True needs a training folder (root) whose checkpoints to continue.")
        refuse_stale(self.root, resume)
        self.step = self.tokens_seen = self.label_tokens = 0
        self._stop, self._eval_time = None, 0.0
        resumed_from = None
        self._restored = {"losses": [], "eval": {}}
        if resume and (ckpt_path := latest_checkpoint(self.root)) is not None:
            self._restore(ckpt_path)
            resumed_from = self.step
        start = self.step
        self.history = {"losses": self._restored["losses"], "eval": self._restored["eval"], "stopped": None,
                        "stopped_at": None, "stop_loss": None, "restored_to_step": None, "stop_message": None,
                        "resumed_from": resumed_from}
        history = self.history
        log = (TrainLog(self.root / "train_log.jsonl", resume_step=start)
               if self.root is not None and acc.is_main_process else None)
        pad = pad_id(self.tokenizer)
        label_counts = [sum(t != IGNORE for t in lab[1:]) for lab in self.train_data.labels]  # tokens with a loss
        good = {n: p.detach().clone() for n, p in self.named_params.items()}
        good_step = start
        if cfg.gradient_checkpointing:
            set_activation_checkpointing(unwrap(self.model), True)
        try:
            t0 = time.perf_counter()
            self.model.train()
            self._call("on_train_begin")
            if cfg.eval_every and start == 0:
                rec0 = {"step": 0, "eval_ppl": self.evaluate(0)}
                if log is not None:
                    log.append(rec0)
            bar = tqdm(total=cfg.steps, initial=start, desc=self.desc, unit="step",
                       disable=not acc.is_local_main_process)
            for step in range(start + 1, cfg.steps + 1):
                if self._stop is not None:  # asked for in on_train_begin: no step runs
                    history.update(stopped=self._stop, stopped_at=self.step)
                    break
                step_loss, ce_mean, n_label, tokens = self._forward_backward(step - 1, pad, label_counts)
                grad_norm = self._clip(cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                finite = grad_norm is None or math.isfinite(float(grad_norm))
                verdict = self.guard.check(step_loss if finite else math.nan)
                if verdict in STOPS:
                    norm = f", gradient norm {float(grad_norm):.4g}" if grad_norm is not None else ""
                    what = (f"a non-finite loss or gradient (loss {step_loss:.4g}{norm})" if verdict == "nan" else
                            f"divergence (loss {step_loss:.4g}, above {cfg.divergence:g} x the best smoothed loss "
                            f"{self.guard.best:.4g} for {cfg.divergence_patience} step(s))")
                    self._halt(verdict, step, what, step_loss, good, good_step)
                    break
                if verdict == "ok":  # the weights this loss was measured on are known good
                    for n, p in self.named_params.items():
                        good[n].copy_(p.detach())
                    good_step = step - 1
                self._call("on_before_optimizer_step", step)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step = step
                self.label_tokens += n_label
                self.tokens_seen += tokens
                record = {"step": step, "loss": step_loss, "ce": ce_mean, "lr": self.scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "tokens_seen": self.tokens_seen, "label_tokens": self.label_tokens}
                if ce_mean is None:
                    record.pop("ce")
                history["losses"].append(step_loss)
                self._call("on_step_end", step, record)
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    record["eval_ppl"] = self.evaluate(step)
                if log is not None and (step % cfg.log_every == 0 or step == cfg.steps or "eval_ppl" in record):
                    log.append(record)
                stopping = self._stop is not None
                if self.root is not None and cfg.save_every and (step % cfg.save_every == 0 or stopping):
                    if not self._finite():  # never checkpoint them
                        self._halt("nan", step, "non-finite trainable weights after the update", step_loss, good,
                                   good_step)
                        break
                    self._save(step)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}")
                if stopping:
                    history.update(stopped=self._stop, stopped_at=step)
                    break
            bar.close()
            if not diverged(history) and not self._finite():  # the last update: never returned
                self._halt("nan", self.step, "non-finite trainable weights after the update",
                           history["losses"][-1] if history["losses"] else None, good, good_step)
            elapsed = time.perf_counter() - t0 - self._eval_time  # training time only
            history["eval_time_s"] = self._eval_time
            if history["restored_to_step"] is not None and cfg.eval_every:
                self.evaluate("restored")
        finally:
            if cfg.gradient_checkpointing:
                set_activation_checkpointing(unwrap(self.model), False)
        self._unshard()
        self.model.eval()
        history.update(self._summary(start, elapsed))
        if log is not None:
            # paths relative to root's parent (the run directory), so the run directory can be moved
            base = self.root.parent
            history["log"] = log.path.relative_to(base).as_posix()
            plot = plot_losses(log.records, self.root / "loss.png", f"LoRA recovery on {cfg.data}")
            history["plot"] = plot.relative_to(base).as_posix() if plot else None
        self._call("on_train_end", history)
        acc.wait_for_everyone()
        return history

    def _summary(self, start: int, elapsed: float) -> dict:
        cfg, acc, done = self.config, self.acc, self.step
        losses = self.history["losses"]
        ran = max(done - start, 0)
        seqs = cfg.batch_size * cfg.grad_accum * acc.num_processes
        return {
            "steps_planned": cfg.steps, "steps_done": done, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "time_s": elapsed,
            "s_per_step": elapsed / ran if ran else None, "processes": acc.num_processes, "device": str(acc.device),
            # sequences per forward pass: batch_size, or fewer after running out of memory
            "micro_batch_rows": min(self.backoff.size, cfg.batch_size),
            "data": self.train_data.record, "epochs": self.sampler.epochs(done),
            "budget": {"tokens": self.tokens_seen, "label_tokens": self.label_tokens, "sequences": done * seqs,
                       "sequences_per_step": seqs,
                       "statement": f"{done} steps x {seqs} sequences (<= {cfg.seqlen} tokens) = "
                                    f"{self.tokens_seen:,} tokens seen, {self.label_tokens:,} trained on"},
            "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
                     "target_modules": cfg.target_modules or "all block projections"},
        }
