"""The training runs of tests/test_multiprocess.py, run by plain `python` (one process) or under
`accelerate launch` (several); every process writes what it saw to OUT.rank<N>.pt.

    python multiprocess_worker.py method NAME BATCH TOK_DIR TEXT OUT
        shearkit.prune(tiny llama, NAME) with its training at BATCH sequences per process and step.
    python multiprocess_worker.py recover BATCH TOK_DIR TEXT OUT [--force-fsdp]
        2 optimizer steps of shearkit.recover (merge=False, so the trained peft model comes back as is).
    python multiprocess_worker.py resume BATCH TOK_DIR TEXT OUT
        4 steps of shearkit.recover with LoRA dropout and a checkpoint every 2 steps; then its last
        checkpoint removed and the run resumed from step 2 (each process must get its own dropout stream back).
    python multiprocess_worker.py shared BATCH TOK_DIR TEXT OUT [--force-fsdp]
        FlexiGPT's shared blocks (one block a weight-shared copy of another) trained for 2 steps by the
        Trainer; under a per-layer FSDP config: shearkit's refusal, then what FSDP does without it.

`--force-fsdp`: accelerate uses FSDP only on accelerator devices (on the CPU it drops the FSDP plugin
and runs DDP); this puts accelerate's FSDP state in place with the plugin built from the launcher's
environment (that is, from the config file), so the Trainer's Accelerator wraps the model in FSDP as
it would on GPUs. Launch with `--fsdp_sync_module_states false`: with it true accelerate refuses to
build the plugin on a machine without an accelerator.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import VOCAB, make_tiny  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
PATHS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]
RUNS: list[dict] = []


def record_fits() -> None:
    """Every Trainer.fit of the run appends what it ran on and its losses to RUNS."""
    from shearkit.recovery import loop

    init, fit = loop.Trainer.__init__, loop.Trainer.fit

    def init_recorded(self, model, *args, **kwargs):
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}  # before wrapping
        init(self, model, *args, **kwargs)
        self._wrapper = type(self.wrapped).__name__  # what accelerate wrapped the model in

    def recorded(self, *args, **kwargs):
        before = self._shapes
        history = fit(self, *args, **kwargs)
        RUNS.append({"desc": self.desc, "losses": list(history["losses"]), "processes": self.acc.num_processes,
                     "distributed_type": str(self.acc.distributed_type).split(".")[-1],
                     "wrapper": self._wrapper,
                     "whole_after_fit": all(tuple(p.shape) == before[n] for n, p in self.named_params.items())})
        return history

    loop.Trainer.__init__, loop.Trainer.fit = init_recorded, recorded


def force_fsdp_on_cpu() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    Accelerator(cpu=True)  # MULTI_CPU over gloo, as accelerate starts it on the CPU
    for state in (PartialState(), AcceleratorState()):
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")  # MULTI_CPU's "cpu:0" fails FSDP's compute-device check
    AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin()  # from FSDP_* (the config file)


def run_method(name: str, bs: int, tok, text: str) -> dict:
    import shearkit

    model = make_tiny("llama")
    data_dir = os.environ.get("SHEARKIT_DATA")
    if name == "loraprune":
        plan = shearkit.prune(model, tok, "loraprune", 0.3, prune_every=2, dropout=0.0,
                              train={"steps": 8, "data": text, "seqlen": 16, "batch_size": bs, "lr": 5e-3})
    elif name == "lorashear":
        plan = shearkit.prune(model, tok, "lorashear", 0.25, data_dir=data_dir, dropout=0.0, gamma=0.34,
                              analysis_windows=2, analysis_seqlen=16, periods=2, warmup=0.25,
                              train={"steps": 6, "seqlen": 256, "batch_size": bs, "lr": 5e-3},
                              recovery={"steps": 4, "seqlen": 256, "batch_size": bs, "lr": 5e-3},
                              dynamic={"round_steps": 2, "heldout_windows": 2, "heldout_seqlen": 16,
                                       "heldout_examples": 2})
    elif name == "flexigpt":
        calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
        plan = shearkit.prune(model, tok, "flexigpt", calib=calib, blocks=1, rank=4,
                              train={"steps": 6, "data": text, "seqlen": 16, "batch_size": bs, "lr": 1e-2})
    else:
        raise SystemExit(f"unknown method {name}")
    return {"plan": plan.to_dict(), "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def run_recover(bs: int, tok, text: str) -> dict:
    from shearkit.recovery import RecoverConfig, recover

    cfg = RecoverConfig(data=text, steps=2, batch_size=bs, seqlen=16, lr=5e-3, warmup=0, dropout=0.0, merge=False)
    norms: list[float] = []  # the gradient norm the Trainer clipped by, as this process computed it
    model, _ = recover(make_tiny("llama"), tok, cfg, on_step=lambda step, rec: norms.append(rec["grad_norm"]))
    return {"grad_norms": norms, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def run_resume(bs: int, tok, text: str, out: str) -> dict:
    import shutil

    from accelerate import PartialState

    from shearkit.recovery import RecoverConfig, recover

    cfg = RecoverConfig(data=text, steps=4, batch_size=bs, seqlen=16, lr=5e-3, warmup=0, dropout=0.1, merge=False,
                        save_every=2)
    root = Path(f"{out}.run")
    lora = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items() if "lora_" in k}  # noqa: E731
    whole, h1 = recover(make_tiny("llama"), tok, cfg, out_dir=root)
    PartialState().wait_for_everyone()
    if RANK == 0:
        (last,) = list(root.rglob("checkpoint-4"))
        shutil.rmtree(last)
    PartialState().wait_for_everyone()
    resumed, h2 = recover(make_tiny("llama"), tok, cfg, out_dir=root, resume=True)
    return {"whole": lora(whole), "resumed": lora(resumed), "losses": [h1["losses"], h2["losses"]],
            "resumed_from": h2.get("resumed_from"), "dropout_draw": torch.rand(4).tolist()}


def run_shared(bs: int, tok, text: str) -> dict:
    import shearkit
    from shearkit.arch import get_adapter
    from shearkit.errors import ShearkitError
    from shearkit.methods.flexigpt import shared_train_config
    from shearkit.recovery.data import build_train_data
    from shearkit.recovery.loop import Trainer
    from shearkit.surgery.shared_block import has_shared_blocks, shared_parameters, train_only_shared_parts

    out: dict = {}
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    train = {"steps": 2, "data": text, "seqlen": 16, "batch_size": bs, "lr": 1e-2, "warmup": 0}
    fresh = make_tiny("llama")
    try:  # FlexiGPT itself, training on: refused (or not) before the model is changed
        shearkit.prune(fresh, tok, "flexigpt", calib=calib, blocks=1, rank=4, train={**train, "steps": 1})
    except ShearkitError as e:
        out["prune_refused"] = str(e)
    out["changed_after_refusal"] = has_shared_blocks(fresh) and "prune_refused" in out

    model = make_tiny("llama")
    plan = shearkit.prune(model, None, "flexigpt", calib=calib, blocks=1, rank=4, training=False)
    (i, j), = [(int(k), int(v)) for k, v in plan.replaced.items()]
    out["replaced"] = [i, j]
    layers = get_adapter(model).layers
    base = {p: layers[j].get_submodule(p) for p in PATHS}
    copy = {p: layers[i].get_submodule(p) for p in PATHS}
    frozen = {p: m.weight.detach().clone() for p, m in base.items()}
    seen = out["seen"] = []  # what the copy's projections compute with, at every forward

    def hook(path):
        def pre(mod, args):
            w = mod.weight
            seen.append({"path": path, "shape": list(w.shape),
                         "same_tensor": w.data_ptr() == base[path].weight.data_ptr(),
                         "values": tuple(w.shape) == tuple(frozen[path].shape) and torch.equal(w, frozen[path])})
        return pre

    for p in PATHS:
        copy[p].register_forward_pre_hook(hook(p))
    out["model_numel"] = sum(p.numel() for p in model.parameters())  # each parameter once, before any wrapping
    cfg = shared_train_config(train, 4, 0, "prune")
    data = build_train_data(tok, text, seqlen=16)

    def train_and_check(trainer) -> None:
        out["wrapper"] = type(trainer.wrapped).__name__
        flat = getattr(trainer.wrapped, "_flat_param", None)
        if flat is not None:  # FSDP with one unit: the parameters it holds, once each
            out["flat_fqns"] = list(flat._fqns)
            out["flat_numel"] = int(flat._unpadded_unsharded_size.numel())
        trainer.fit()  # under FSDP the Trainer hands the model back whole
        with torch.no_grad():
            out["after"] = {
                "base_unchanged": all(torch.equal(base[p].weight, frozen[p]) for p in PATHS),
                "one_tensor": all(copy[p].shared is base[p] and copy[p].weight.data_ptr() == base[p].weight.data_ptr()
                                  for p in PATHS),
                "adapters": {n: p.detach().clone() for n, p in shared_parameters(model).items()}}

    try:
        with train_only_shared_parts(model):
            train_and_check(Trainer(model, tok, data, cfg))
    except ShearkitError as e:
        out["refused"] = str(e)
        # what FSDP does to shared weights without the refusal
        for p in model.parameters():
            p.requires_grad_(False)
        for p in shared_parameters(model).values():
            p.requires_grad_(True)
        try:
            train_and_check(Trainer(model, tok, data, cfg))
        except Exception as err:  # noqa: BLE001 - recorded for the test to assert
            out["fsdp_error"] = f"{type(err).__name__}: {err}"
    return out


def main() -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--force-fsdp" in sys.argv:
        force_fsdp_on_cpu()
    record_fits()
    mode = args[0]
    if mode == "method":
        name, bs, tok_dir, text, out = args[1:6]
    else:
        name, (bs, tok_dir, text, out) = mode, args[1:5]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    t0 = time.perf_counter()
    if mode == "method":
        res = run_method(name, int(bs), tok, text)
    elif mode == "recover":
        res = run_recover(int(bs), tok, text)
    elif mode == "shared":
        res = run_shared(int(bs), tok, text)
    elif mode == "resume":
        res = run_resume(int(bs), tok, text, out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    res.update(runs=RUNS, time_s=time.perf_counter() - t0, world=int(os.environ.get("WORLD_SIZE", "1")))
    torch.save(res, f"{out}.rank{RANK}.pt")


if __name__ == "__main__":
    main()
