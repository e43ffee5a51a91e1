"""The shared Trainer: callback order and what each hook sees, callback state through checkpoints
(an interrupted run resumes to the same adapters and callback state), request_stop, optimizer
factories and a custom sampler."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILIES, make_tiny
from shearkit.errors import ShearkitError
from shearkit.recovery.config import RecoverConfig
from shearkit.recovery.data import build_train_data
from shearkit.recovery.loop import Callback, Trainer


def make_trainer(tok, data, *, root=None, callbacks=(), optimizer="adamw", sampler=None, train_norms=False,
                 **kw) -> Trainer:
    """A Trainer over fresh LoRA adapters on the tiny llama (same seed, so runs are comparable);
    `train_norms`: the RMSNorm weights train too (as FlexiGPT's do)."""
    from accelerate.utils import set_seed
    from peft import get_peft_model

    from shearkit.recovery.lora import lora_config

    base = dict(data=str(data), steps=4, batch_size=2, seqlen=16, lr=5e-3, warmup=0, dropout=0.0)
    cfg = RecoverConfig(**{**base, **kw})
    train = build_train_data(tok, cfg.data, seqlen=cfg.seqlen)
    model = make_tiny("llama")
    set_seed(cfg.seed)
    peft_model = get_peft_model(model, lora_config(model, cfg.rank, cfg.alpha, cfg.dropout, None))
    for n, p in peft_model.named_parameters():
        if train_norms and "norm" in n:
            p.requires_grad_(True)
    return Trainer(peft_model, tok, train, cfg, callbacks=callbacks, optimizer=optimizer, sampler=sampler,
                   root=root, desc="test")


def adapters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.named_params.items()}


class Recorder(Callback):
    """Logs every hook call; keeps the gradients and weights seen before each optimizer step."""

    def __init__(self):
        self.events: list = []
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, trainer):
        self.events.append("begin")
        self.after[0] = adapters(trainer)

    def on_before_optimizer_step(self, trainer, step):
        self.events.append(("before", step))
        self.grads[step] = {n: p.grad.detach().clone() for n, p in trainer.named_params.items()}
        self.before[step] = adapters(trainer)

    def on_step_end(self, trainer, step, record):
        self.events.append(("end", step))
        assert all(p.grad is None for p in trainer.params)  # after zero_grad
        self.after[step] = adapters(trainer)
        record["seen_by_callback"] = step

    def on_evaluate(self, trainer, step, results):
        self.events.append(("eval", step))

    def on_checkpoint(self, trainer, step, path):
        assert (path / "trainer_state.json").is_file()
        self.events.append(("ckpt", step))

    def on_train_end(self, trainer, history):
        self.events.append("end_of_training")


def test_hooks_run_in_order_and_see_the_clipped_gradient(tiny_tokenizer, text_file, tmp_path):
    """Before the step, every .grad is the clipped gradient the optimizer then applies (plain SGD:
    w_after = w_before - lr * grad exactly) and the weights are still those of the previous step."""
    rec = Recorder()
    tr = make_trainer(tiny_tokenizer, text_file, root=tmp_path / "train", callbacks=[rec], optimizer="sgd",
                      steps=3, lr=0.5, schedule="constant", max_grad_norm=1e-3, save_every=2, eval_every=2,
                      eval_tasks=[str(text_file)], eval_limit=1)
    h = tr.fit()
    assert rec.events == ["begin", ("eval", 0), ("before", 1), ("end", 1), ("before", 2), ("end", 2), ("eval", 2),
                          ("ckpt", 2), ("before", 3), ("end", 3), ("eval", 3), "end_of_training"]
    log = [json.loads(x) for x in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("seen_by_callback") for r in log] == [None, 1, 2, 3]  # keys added in on_step_end are logged
    assert h["steps_done"] == 3 and h["log"] == "train/train_log.jsonl"
    for step in (1, 2, 3):
        grads = rec.grads[step]
        assert all(torch.isfinite(g).all() for g in grads.values())
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        assert log[step]["grad_norm"] > 1e-2  # clipping was active ...
        assert float(norm) == pytest.approx(1e-3, rel=1e-4)  # ... and the callback saw the clipped gradient
        for n, w in rec.before[step].items():
            assert torch.equal(w, rec.after[step - 1][n])  # not yet stepped
            torch.testing.assert_close(rec.after[step][n], w - 0.5 * grads[n], rtol=0, atol=1e-7)


class EmaState(Callback):
    """Stateful like a method's importance tracker: a tensor EMA of |grad| per parameter, a nested
    tensor, a counter and a list (all checkpointed)."""

    name = "ema"

    def __init__(self):
        self.ema: dict[str, torch.Tensor] = {}
        self.count = 0
        self.steps: list[int] = []

    def on_before_optimizer_step(self, trainer, step):
        for n, p in trainer.named_params.items():
            g = p.grad.detach().abs()
            self.ema[n] = g if n not in self.ema else 0.9 * self.ema[n] + 0.1 * g
        self.count += 1
        self.steps.append(step)

    def state_dict(self):
        return {"ema": dict(self.ema), "count": self.count, "steps": list(self.steps)}

    def load_state_dict(self, state):
        self.ema, self.count, self.steps = dict(state["ema"]), state["count"], list(state["steps"])


class StopAt(Callback):
    def __init__(self, step: int, crash: bool = False):
        self.at, self.crash = step, crash

    def on_step_end(self, trainer, step, record):
        if step == self.at:
            if self.crash:
                raise KeyboardInterrupt
            trainer.request_stop(f"stop at {step}")


@pytest.mark.parametrize("how", ["request_stop", "exception"])
def test_interrupted_run_resumes_to_the_same_weights_and_callback_state(tiny_tokenizer, text_file, tmp_path, how):
    # dropout: the RNG must resume too; norms: trainable parameters besides the adapters resume too
    settings = dict(steps=6, save_every=2, dropout=0.1, grad_accum=2, train_norms=True)
    full_cb = EmaState()
    full = make_trainer(tiny_tokenizer, text_file, root=tmp_path / "a", callbacks=[full_cb], **settings)
    full.fit()

    cb = EmaState()
    stopper = StopAt(3, crash=how == "exception")
    first = make_trainer(tiny_tokenizer, text_file, root=tmp_path / "b", callbacks=[cb, stopper], **settings)
    if how == "exception":
        with pytest.raises(KeyboardInterrupt):
            first.fit()
        resumes_from = 2  # the last periodic checkpoint
    else:
        h = first.fit()
        assert (h["stopped"], h["stopped_at"], h["steps_done"], len(h["losses"])) == ("stop at 3", 3, 3, 3)
        resumes_from = 3  # a requested stop checkpoints the step it ends at
    ckpt = tmp_path / "b" / f"checkpoint-{resumes_from}"
    assert (ckpt / "callbacks.safetensors").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())["callbacks"]["ema"]
    assert state["count"] == resumes_from and state["steps"] == list(range(1, resumes_from + 1))

    cb2 = EmaState()
    resumed = make_trainer(tiny_tokenizer, text_file, root=tmp_path / "b", callbacks=[cb2], **settings)
    h = resumed.fit(resume=True)
    assert h["resumed_from"] == resumes_from and h["steps_done"] == 6
    wa, wb = adapters(full), adapters(resumed)
    assert any("norm" in n for n in wa) and any("lora_" in n for n in wa)
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
    assert cb2.count == full_cb.count == 6 and cb2.steps == full_cb.steps
    assert cb2.ema.keys() == full_cb.ema.keys()
    for n in full_cb.ema:
        assert torch.equal(cb2.ema[n], full_cb.ema[n]), n


def test_resume_refuses_a_checkpoint_without_the_callbacks_state(tiny_tokenizer, text_file, tmp_path):
    make_trainer(tiny_tokenizer, text_file, root=tmp_path, steps=2, save_every=1, callbacks=[EmaState()]).fit()
    with pytest.raises(ShearkitError, match="callbacks"):
        make_trainer(tiny_tokenizer, text_file, root=tmp_path, steps=2, save_every=1).fit(resume=True)
    with pytest.raises(ShearkitError, match="AdamW optimizer, this run uses SGD"):
        make_trainer(tiny_tokenizer, text_file, root=tmp_path, steps=2, save_every=1, callbacks=[EmaState()],
                     optimizer="sgd").fit(resume=True)


def test_request_stop_ends_at_the_requested_step(tiny_tokenizer, text_file):
    rec = Recorder()
    h = make_trainer(tiny_tokenizer, text_file, steps=6, callbacks=[rec, StopAt(2)]).fit()
    assert h["stopped"] == "stop at 2" and h["steps_done"] == 2 and len(h["losses"]) == 2
    assert h["restored_to_step"] is None  # a clean stop restores nothing
    assert [e for e in rec.events if isinstance(e, tuple)][-1] == ("end", 2) and rec.events[-1] == "end_of_training"


def test_optimizer_names_and_factories(tiny_tokenizer, text_file):
    assert type(make_trainer(tiny_tokenizer, text_file).optimizer.optimizer) is torch.optim.AdamW
    calls = []

    def momentum_sgd(params, config):
        calls.append((len(params), config.lr))
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9)

    tr = make_trainer(tiny_tokenizer, text_file, optimizer=momentum_sgd, steps=2)
    before = adapters(tr)
    tr.fit()
    assert calls == [(len(tr.params), 5e-3)]
    assert all("momentum_buffer" in tr.optimizer.state[p] for p in tr.params)  # the factory's optimizer stepped
    assert any(not torch.equal(before[n], w) for n, w in adapters(tr).items())
    with pytest.raises(ShearkitError, match="Did you mean 'sgd'"):
        make_trainer(tiny_tokenizer, text_file, optimizer="sdg")
    with pytest.raises(ShearkitError, match="not a torch.optim.Optimizer"):
        make_trainer(tiny_tokenizer, text_file, optimizer=lambda params, config: None)


class FirstTwo:
    """A sampler that always trains on examples 0 and 1, with a state counting its calls."""

    def __init__(self):
        self.calls: list[tuple[int, int, int]] = []

    def indices(self, step, micro, process=0):
        self.calls.append((step, micro, process))
        return [0, 1]

    def epochs(self, steps):
        return 0.0

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        pass


def test_custom_sampler_is_used_and_checkpointed(tiny_tokenizer, text_file, tmp_path):
    sampler = FirstTwo()
    tr = make_trainer(tiny_tokenizer, text_file, sampler=sampler, root=tmp_path, steps=3, save_every=3)
    h = tr.fit()
    assert {c[0] for c in sampler.calls} == {0, 1, 2} and h["epochs"] == 0.0
    assert h["budget"]["tokens"] == 3 * 2 * 16
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["sampler"] == {"calls": len(sampler.calls)}
    # step 1's loss is the untrained model's mean token loss on examples 0 and 1 (LoRA's B starts at 0)
    from shearkit.recovery.data import collate

    batch = collate(tr.train_data, [0, 1], pad=0)
    with torch.no_grad():
        logits = make_tiny("llama")(input_ids=batch["input_ids"]).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           batch["labels"][:, 1:].reshape(-1))
    assert h["losses"][0] == pytest.approx(float(ce), rel=1e-5)


def test_callbacks_need_distinct_names(tiny_tokenizer, text_file):
    with pytest.raises(ShearkitError, match="distinct names.*ema"):
        make_trainer(tiny_tokenizer, text_file, callbacks=[EmaState(), EmaState()])


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_of_labelled_positions_only_give_the_same_loss_and_gradients(family, chat_tok, tmp_path):
    """The output head run on labelled positions only (`logits_to_keep` as a mask) gives the loss,
    distillation term and gradients of the full-logits computation (prompts and padding unlabelled)."""
    from shearkit.recovery.data import collate
    from shearkit.recovery.loop import _step_loss, selects_logits

    recs = [{"instruction": f"say {w} " * (i + 1), "output": f"the {w} fox"} for i, w in enumerate(["quick", "lazy"])]
    (tmp_path / "i.json").write_text(json.dumps(recs))
    data = build_train_data(chat_tok, str(tmp_path / "i.json"), seqlen=64)
    batch = collate(data, [0, 1], pad=2)
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).sum() > 4  # padding and prompts
    n = int((batch["labels"][:, 1:] != -100).sum())
    model, teacher = make_tiny(family), make_tiny(family, seed=1)
    assert selects_logits(model) and selects_logits(teacher)
    cfg = RecoverConfig(distill_weight=0.5)
    out = {}
    for select in [(False, False), (True, True)]:
        model.zero_grad()
        loss, ce = _step_loss(model, batch, n, teacher, cfg, select)
        loss.backward()
        out[select] = (loss.detach(), ce, {k: p.grad.clone() for k, p in model.named_parameters()})
    (l0, c0, g0), (l1, c1, g1) = out.values()
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    torch.testing.assert_close(c1, c0, rtol=1e-6, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)
