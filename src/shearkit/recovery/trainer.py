"""The LoRA recovery loop: peft for the adapters, accelerate for devices and accumulation.

The same loop runs on CPU, one GPU, or several GPUs under `accelerate launch` (each process
takes its own slice of every step's examples; losses are reduced across processes).

Lifecycle of one optimizer step `s` (1-based in logs):
1. `grad_accum` micro-batches, each loss = (summed token loss) / (label tokens of the whole
   step), so accumulating 2 x 1 sequences equals 1 x 2 sequences;
2. a NaN/inf loss or gradient, or a loss above `divergence` x the best smoothed loss for
   `divergence_patience` steps, stops training and restores the last adapter weights whose
   loss was finite and in range;
3. clip, optimizer and scheduler step; log; evaluate / checkpoint at their intervals.

A sparse model keeps its zeros: the LoRA layers over its sparse weights apply their update
through the weights' keep-masks (`masked.py`) in training, evaluation and merge.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ..errors import ShearkitError
from ..recipe import build_config
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .config import RecoverConfig
from .data import IGNORE, StepSampler, TrainData, build_train_data, collate, pad_id
from .lora import lora_config
from .trainlog import TrainLog, plot_losses

if TYPE_CHECKING:
    from ..plan import Plan

SCHEDULE_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# settings that must not change between a checkpoint and the run resuming from it
RESUME_KEYS = ("steps", "data", "mode", "seqlen", "batch_size", "grad_accum", "lr", "schedule", "warmup", "rank",
               "alpha", "dropout", "target_modules", "seed", "weight_decay", "distill_weight")


class DivergenceGuard:
    """Tracks the smoothed loss; judges each step's loss `ok`, `suspect` or a stop reason."""

    def __init__(self, factor: float, patience: int, beta: float = 0.9):
        self.factor, self.patience, self.beta = factor, patience, beta
        self.ema: float | None = None
        self.best = math.inf
        self.streak = 0

    def check(self, loss: float) -> str:
        """`ok`, `suspect` (above the threshold, within patience), `nan` or `diverged`."""
        if not math.isfinite(loss):
            return "nan"
        if self.factor > 0 and math.isfinite(self.best) and loss > self.factor * self.best:
            self.streak += 1
            return "diverged" if self.streak >= self.patience else "suspect"
        self.streak = 0
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        self.best = min(self.best, self.ema)
        return "ok"

    def state(self) -> dict:
        return {"ema": self.ema, "best": self.best if math.isfinite(self.best) else None, "streak": self.streak}

    def load(self, s: dict) -> None:
        self.ema, self.streak = s["ema"], s["streak"]
        self.best = math.inf if s["best"] is None else s["best"]


def _checkpointing(model, on: bool) -> None:
    """Activation checkpointing on or off (transformers renamed the methods in 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:  # non-reentrant: gradients reach the adapters although the inputs need none
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _resolve_config(config: RecoverConfig | dict | None) -> RecoverConfig:
    if config is None:
        return RecoverConfig()
    if isinstance(config, dict):
        return build_config(RecoverConfig, config, "recover")
    if not isinstance(config, RecoverConfig):
        raise ShearkitError(f"recover() takes a RecoverConfig or a dict, got {type(config).__name__}.")
    return config


def _adapter_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _step_loss(model, batch: dict, n_label: int, teacher, cfg: RecoverConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, summed CE) of one micro-batch; normalised by the step's label tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    student = logits[:, :-1][mask].float()
    ce = F.cross_entropy(student, labels[mask], reduction="sum")
    loss = ce
    if teacher is not None and cfg.distill_weight > 0:
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits[:, :-1][mask].float()
        temp = cfg.distill_temperature
        t_logp = F.log_softmax(t_logits / temp, dim=-1)
        s_logp = F.log_softmax(student / temp, dim=-1)
        kd = (t_logp.exp() * (t_logp - s_logp)).sum() * temp * temp  # KL(teacher || student), Hinton scaling
        loss = (1 - cfg.distill_weight) * ce + cfg.distill_weight * kd
    return loss / max(n_label, 1), ce.detach()


def _forward_backward(acc, model, train: TrainData, sampler: StepSampler, step: int, pad: int,
                      label_counts: list[int], teacher, cfg: RecoverConfig) -> tuple[float, float | None, int, int]:
    """Accumulate the gradients of one optimizer step (0-based `step`) on this process.

    Returns (mean loss of the step over all processes, mean CE when distilling else None,
    label tokens of the step, input tokens of the step).
    """
    # label tokens of the whole step over every process (the sampler is deterministic, so no
    # communication is needed): normalising by it makes 2 processes x 1 sequence, 1 x 2 and
    # 2 micro-batches x 1 the same update
    n_label = sum(label_counts[i] for p in range(acc.num_processes) for m in range(cfg.grad_accum)
                  for i in sampler.indices(step, m, p))
    loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
    ce_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
    tokens = 0
    for m in range(cfg.grad_accum):
        batch = {k: v.to(acc.device) for k, v in collate(train, sampler.indices(step, m, acc.process_index), pad).items()}
        tokens += int(batch["attention_mask"].sum())
        with acc.accumulate(model):
            loss, ce = _step_loss(model, batch, n_label, teacher, cfg)
            # accelerate divides by grad_accum and DDP averages over processes; undo both,
            # since the loss is already this process's share of the step's mean
            acc.backward(loss * cfg.grad_accum * acc.num_processes)
        loss_sum += loss.detach().double()
        ce_sum += ce.double()
    sums = acc.reduce(torch.stack([loss_sum, ce_sum, torch.tensor(float(tokens), device=acc.device,
                                                                  dtype=torch.float64)]), "sum")
    ce_mean = float(sums[1]) / max(n_label, 1) if teacher is not None else None
    return float(sums[0]), ce_mean, n_label, int(sums[2])


def _check_teacher(model, teacher, cfg: RecoverConfig):
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


def recover(model, tokenizer, config: RecoverConfig | dict | None = None, *, teacher=None,
            out_dir: str | os.PathLike | None = None, resume: bool = False,
            data_dir: str | os.PathLike | None = None,
            on_step: Callable[[int, dict], None] | None = None,
            masks: Plan | Mapping[str, torch.Tensor] | str | None = "auto") -> tuple[Any, dict]:
    """Fine-tune LoRA adapters on a (pruned) model to recover its quality, then merge them.

    Args:
        model: a causal LM of a supported family (any per-layer widths), or a peft model whose
            adapters should be trained further. It is trained in place.
        tokenizer: its tokenizer (its chat template, if any, formats instruction data).
        config: a `RecoverConfig` or a dict of its fields.
        teacher: the dense model, for distillation when `config.distill_weight > 0` (moved to
            the training device and put in eval mode; its vocabulary must match).
        out_dir: where `recovery/` (train_log.jsonl, loss.png, checkpoints, adapter) is written; the
            history names these files relative to it.
        resume: continue from the newest checkpoint under `out_dir/recovery` (fresh if none).
        data_dir: the local data directory (default: `config.data_dir`, then $SHEARKIT_DATA).
        on_step: called as `on_step(step, record)` after every optimizer step.
        masks: the zeros to keep (LoRA is trained, evaluated and merged under them, so the
            merged weights have exactly the same zeros): the model's pruning `Plan` (its masks,
            or the model's zeros in the layers it sparsified), a mapping of module name ->
            (out, in) keep-mask, "auto" (default: the adapted weights' zeros, when at least 1%
            of them are zero) or None (a dense update, which fills pruned weights).

    Returns:
        (model, history): the merged model (`config.merge`, default) or the peft model, and a
        record of the run: losses, evaluations, stop reason, restored step, and the budget in
        tokens.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_scheduler

    from ..plan import Plan, fingerprint
    from .masked import mask_lora_layers, plan_masks, rezero

    cfg = _resolve_config(config)
    if resume and out_dir is None:
        raise ShearkitError("resume=True needs out_dir, the folder whose recovery/ holds the checkpoints.")
    teacher = _check_teacher(model, teacher, cfg)
    data_dir = data_dir or cfg.data_dir
    train = build_train_data(tokenizer, cfg.data, mode=cfg.mode, seqlen=cfg.seqlen, split=cfg.split,
                             data_dir=data_dir)
    root = Path(out_dir) / "recovery" if out_dir is not None else None
    if root is not None and not resume and latest_checkpoint(root) is not None:
        raise ShearkitError(f"{root} already holds checkpoints of an earlier run; pass resume=True (CLI: --resume) "
                            "to continue it, or choose another output directory.")

    is_peft = isinstance(model, PeftModel)
    if isinstance(masks, Plan):
        masks = plan_masks(model.get_base_model() if is_peft else model, masks)
    lcfg = None if is_peft else lora_config(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules)
    base_fp = fingerprint(model)
    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=device.type == "cpu")
    set_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        _checkpointing(model, True)
    peft_model = model if is_peft else get_peft_model(model, lcfg)
    kept = mask_lora_layers(peft_model, masks)
    params = list(_adapter_params(peft_model).values())
    if not params:
        raise ShearkitError("The model has no trainable adapter parameters.")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(SCHEDULE_NAMES[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    wrapped, optimizer = acc.prepare(peft_model, optimizer)
    if teacher is not None:
        teacher.to(acc.device).eval()

    guard = DivergenceGuard(cfg.divergence, cfg.divergence_patience)
    start, tokens_seen, label_tokens, resumed_from = 0, 0, 0, None
    if resume and (ckpt_path := latest_checkpoint(root)) is not None:
        ckpt = load_checkpoint(ckpt_path)
        st = ckpt["state"]
        if st.get("base_fingerprint") != base_fp:
            raise ShearkitError(f"Checkpoint {ckpt_path} was made from other base weights; resume with the same model "
                                "or start a new run directory.")
        if st.get("processes", 1) != acc.num_processes:
            raise ShearkitError(f"Checkpoint {ckpt_path} was written by {st.get('processes', 1)} process(es); resume "
                                f"with the same number (now {acc.num_processes}) so each step sees the same batches.")
        changed = [k for k in RESUME_KEYS if st["config"].get(k) != cfg.to_dict().get(k)]
        if changed:
            raise ShearkitError(f"Cannot resume from {ckpt_path}: recover.{', recover.'.join(changed)} changed "
                                "since it was written; use the same settings or a new run directory.")
        set_peft_model_state_dict(peft_model, {k: v.to(acc.device) for k, v in ckpt["adapter"].items()})
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        set_rng_state(ckpt["rng"])
        guard.load(st["guard"])
        start, tokens_seen, label_tokens = st["step"], st["tokens_seen"], st["label_tokens"]
        resumed_from = start
    log = TrainLog(root / "train_log.jsonl", resume_step=start) if root is not None and acc.is_main_process else None

    sampler = StepSampler(len(train), cfg.batch_size, cfg.grad_accum, acc.num_processes, cfg.seed)
    pad = pad_id(tokenizer)
    label_counts = [sum(t != IGNORE for t in lab[1:]) for lab in train.labels]  # tokens with a loss
    good = {n: p.detach().clone() for n, p in _adapter_params(peft_model).items()}
    good_step = start
    history: dict[str, Any] = {"losses": [], "eval": {}, "stopped": None, "stopped_at": None, "stop_loss": None,
                               "restored_to_step": None, "resumed_from": resumed_from, "masked_layers": len(kept)}

    eval_time = [0.0]

    def evaluate(step) -> dict[str, float]:
        t = time.perf_counter()
        res = {}
        if acc.is_main_process:
            res = _evaluate(peft_model, tokenizer, cfg, data_dir)
            history["eval"][step] = res
        acc.wait_for_everyone()
        eval_time[0] += time.perf_counter() - t
        return res

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    peft_model.train()
    if cfg.eval_every and start == 0:
        rec0 = {"step": 0, "eval_ppl": evaluate(0)}
        if log is not None:
            log.append(rec0)
    bar = tqdm(total=cfg.steps, initial=start, desc="recover", unit="step", disable=not acc.is_local_main_process)
    step = start
    for step in range(start + 1, cfg.steps + 1):
        step_loss, ce_mean, n_label, tokens = _forward_backward(acc, wrapped, train, sampler, step - 1, pad,
                                                                label_counts, teacher, cfg)
        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        verdict = guard.check(step_loss if grad_norm is None or math.isfinite(float(grad_norm)) else math.nan)
        if verdict in ("nan", "diverged"):
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for n, p in _adapter_params(peft_model).items():
                    p.copy_(good[n])
            history.update(stopped=verdict, stopped_at=step, stop_loss=step_loss, restored_to_step=good_step)
            acc.print(f"recover: {'non-finite loss' if verdict == 'nan' else 'divergence'} at step {step} "
                      f"(loss {step_loss:.4g}); restored the adapters of step {good_step}.")
            break
        if verdict == "ok":  # the weights this loss was measured on are known good
            for n, p in _adapter_params(peft_model).items():
                good[n].copy_(p.detach())
            good_step = step - 1
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        label_tokens += n_label
        tokens_seen += tokens
        record = {"step": step, "loss": step_loss, "ce": ce_mean,
                  "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "tokens_seen": tokens_seen, "label_tokens": label_tokens}
        if ce_mean is None:
            record.pop("ce")
        history["losses"].append(step_loss)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            record["eval_ppl"] = evaluate(step)
        if log is not None and (step % cfg.log_every == 0 or step == cfg.steps or "eval_ppl" in record):
            log.append(record)
        if root is not None and cfg.save_every and step % cfg.save_every == 0:
            if acc.is_main_process:
                save_checkpoint(root, step, get_peft_model_state_dict(peft_model), optimizer.state_dict(), {
                    "scheduler": scheduler.state_dict(), "guard": guard.state(), "tokens_seen": tokens_seen,
                    "label_tokens": label_tokens, "config": cfg.to_dict(), "base_fingerprint": base_fp,
                    "processes": acc.num_processes})
            acc.wait_for_everyone()
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}")
        if on_step is not None:
            on_step(step, record)
    bar.close()
    elapsed = time.perf_counter() - t0 - eval_time[0]  # training time only
    history["eval_time_s"] = eval_time[0]
    if history["stopped"] and cfg.eval_every:
        evaluate("restored")
    peft_model.eval()

    history.update(_summary(cfg, train, acc, start, step, tokens_seen, label_tokens, elapsed, history, sampler))
    if root is not None and acc.is_main_process and log is not None:
        # paths relative to out_dir (the run directory), so the run directory can be moved
        history["log"] = log.path.relative_to(out_dir).as_posix()
        plot = plot_losses(log.records, root / "loss.png", f"LoRA recovery on {cfg.data}")
        history["plot"] = plot.relative_to(out_dir).as_posix() if plot else None
        if cfg.save_adapter:
            from ..io.atomic import atomic_dir

            with atomic_dir(root / "adapter", overwrite=True) as tmp:
                peft_model.save_pretrained(str(tmp))
                if kept:  # the adapters apply only through these masks
                    from ..sparsity.apply import save_masks

                    save_masks(kept, tmp)
            history["adapter_dir"] = (root / "adapter").relative_to(out_dir).as_posix()
    acc.wait_for_everyone()
    if cfg.gradient_checkpointing:
        _checkpointing(peft_model.get_base_model(), False)
    result = peft_model
    if cfg.merge:
        result = peft_model.merge_and_unload()  # masked layers merge their masked update
        rezero(result, kept)
        for n, p in result.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        result.train(was_training)
    history["merged"] = cfg.merge
    acc.free_memory()
    return result, history


def _evaluate(model, tokenizer, cfg: RecoverConfig, data_dir) -> dict[str, float]:
    """Perplexity of each eval set (quick: `eval_limit` windows), in eval mode."""
    from ..eval.perplexity import perplexity

    model.eval()
    try:
        return {t: perplexity(model, tokenizer, t, seqlen=cfg.eval_seqlen or cfg.seqlen, limit=cfg.eval_limit,
                              data_dir=data_dir)["ppl"] for t in cfg.eval_tasks}
    finally:
        model.train()


def _summary(cfg: RecoverConfig, train: TrainData, acc, start: int, last: int, tokens_seen: int, label_tokens: int,
             elapsed: float, history: dict, sampler: StepSampler) -> dict:
    done = last if history["stopped"] is None else history["stopped_at"] - 1
    losses = history["losses"]
    ran = max(done - start, 0)
    return {
        "steps_planned": cfg.steps, "steps_done": done, "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None, "time_s": elapsed,
        "s_per_step": elapsed / ran if ran else None, "processes": acc.num_processes, "device": str(acc.device),
        "data": train.record, "epochs": sampler.epochs(done),
        "budget": {"tokens": tokens_seen, "label_tokens": label_tokens,
                   "sequences": done * cfg.batch_size * cfg.grad_accum * acc.num_processes,
                   "sequences_per_step": cfg.batch_size * cfg.grad_accum * acc.num_processes,
                   "statement": f"{done} steps x {cfg.batch_size * cfg.grad_accum * acc.num_processes} sequences "
                                f"(<= {cfg.seqlen} tokens) = {tokens_seen:,} tokens seen, {label_tokens:,} trained on"},
        "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
                 "target_modules": cfg.target_modules or "all block projections"},
    }
