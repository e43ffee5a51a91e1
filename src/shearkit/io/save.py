"""Save a (pruned) model as a standard Hugging Face directory, atomically, with its provenance.

Uniform widths give a plain `config.json` that vanilla `AutoModelForCausalLM.from_pretrained`
loads (and so vLLM and llama.cpp's converter, which read the same keys). Per-layer widths add
`shearkit_layer_shapes` to the config, weight-shared blocks (FlexiGPT) `shearkit_shared_blocks`
(a shared weight is stored once, under the block that owns it), and either writes
`modeling_shearkit.py` beside the weights, with `auto_map` pointing at it: `shearkit.load(path)`
and `from_pretrained(path, trust_remote_code=True)` then both load it, identically. Weights are safetensors only. Beside
them: the tokenizer, the generation config, `plan.json` (an unstructured plan's masks in
`sparsity/masks.safetensors`), `shearkit.json` (provenance), `metrics.json` when given and a
short `README.md` model card. Everything is written into a
temporary directory that is renamed into place when complete.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import ShearkitError
from ..arch.modules import unwrap
from ..plan import Plan, fingerprint
from .atomic import atomic_dir, write_json, write_text
from .lazy import is_lazy, save_weights
from .modeling import LAYER_SHAPES_KEY, SHARED_BLOCKS_KEY, needs_modeling_file, transformers_class

REMOTE_FILE = "modeling_shearkit.py"


def save(model, tokenizer, path: str | os.PathLike, plan: Plan | None = None, metrics: dict | None = None,
         card: str | None = None, overwrite: bool = False) -> Path:
    """Write `model` (and `tokenizer`) to directory `path`.

    A peft-wrapped model is saved with its adapters merged (on a copy; the wrapper is left as is).

    Args:
        plan: the plan that produced the model (saved as plan.json; method and ratio go into the card).
        metrics: measured results, e.g. `{"wikitext2": {"ppl": 31.2, ...}}`, saved and shown in the card.
        card: README.md text to use instead of the generated card.
        overwrite: replace an existing `path` (only once the new directory is complete).

    Returns:
        The directory written. Raises ShearkitError when `path` is the model's own source directory,
        or when an unstructured plan is given for a model that lost the zeros its masks record.
    """
    from ..sparsity.apply import MODEL_MASKS_FILE, check_plan_zeros
    from ..surgery.sync import _base_class, sync_config

    target = Path(path).expanduser()
    m = unwrap(model)
    if m is not model:  # peft: merge LoRA into a copy
        m = copy.deepcopy(model).merge_and_unload()
    src = getattr(m.config, "_name_or_path", "") or getattr(m.config, "name_or_path", "")
    if src and Path(src).expanduser().exists() and Path(src).expanduser().resolve() == target.resolve():
        raise ShearkitError(f"{target} is the directory the model was loaded from; shearkit never overwrites an "
                            "input model. Choose another output path.")
    if plan is not None:
        check_plan_zeros(m, plan)
    export = sync_config(m)
    base_name = _base_class(m).__name__
    with atomic_dir(target, overwrite=overwrite) as tmp:
        if is_lazy(m):  # blocks on disk: streamed into shards one block at a time
            m.config.save_pretrained(tmp)
            if getattr(m, "generation_config", None) is not None:
                m.generation_config.save_pretrained(tmp)
            save_weights(m, tmp)
        else:
            m.save_pretrained(tmp)
        if list(tmp.glob("*.bin")):
            raise ShearkitError("transformers wrote pickled .bin weights; shearkit saves safetensors only.")
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = [base_name]
        cfg.pop("auto_map", None)
        if export != "per-layer":
            cfg.pop(LAYER_SHAPES_KEY, None)
        if needs_modeling_file(cfg):  # per-layer widths and/or shared blocks
            from .remote_code import source_for

            cfg["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_FILE[:-3]}.ShearkitForCausalLM"}
            # the file is shearkit's own source; the only name in it is a class transformers defines
            write_text(tmp / REMOTE_FILE, source_for(transformers_class(base_name).__name__))
        else:
            (tmp / REMOTE_FILE).unlink(missing_ok=True)
        if SHARED_BLOCKS_KEY in cfg:
            export = "shared-blocks" if export == "vanilla" else f"{export}+shared-blocks"
        write_json(cfg_path, cfg)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:  # masks in a sub-folder: engines read every top-level *.safetensors as weights
            plan.save(tmp / "plan.json", masks_file=MODEL_MASKS_FILE)
        if metrics:
            write_json(tmp / "metrics.json", metrics)
        prov = provenance(m, plan, export)
        write_json(tmp / "shearkit.json", prov)
        write_text(tmp / "README.md", card if card is not None else model_card(prov, plan, metrics))
    return target


def provenance(model, plan: Plan | None, export: str) -> dict[str, Any]:
    """Where a saved model came from and how it loads."""
    import torch
    import transformers

    from ..arch import get_adapter

    counts = get_adapter(model).param_counts()
    sparsity = None
    if plan is not None and plan.kind == "unstructured":
        from ..sparsity.apply import measured_sparsity

        sparsity = measured_sparsity(model, plan)
    return {"shearkit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "export": export, "loads_with": _loads_with(export), "fingerprint": fingerprint(model),
            "params": counts, "base": plan.base if plan else None, "method": plan.method if plan else None,
            "ratio_target": plan.ratio_target if plan else None,
            "ratio_achieved": plan.ratio_achieved if plan else None, "sparsity_measured": sparsity,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()}}


def _loads_with(export: str) -> str:
    if export == "vanilla":
        return "AutoModelForCausalLM.from_pretrained(path) (shearkit not needed); shearkit.load(path)"
    return "shearkit.load(path); AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"


def model_card(prov: dict[str, Any], plan: Plan | None, metrics: dict | None) -> str:
    """A short README.md: base, method, ratio, what was measured (dense, pruned before recovery and this
    model, as the run's metrics record them), how to load."""
    from ..report.render import md_cell
    from ..report.summary import measured_table

    lines = ["# Pruned with shearkit", ""]
    base = (plan.base if plan else None) or {}
    lines.append(f"- Base model: `{base.get('name') or 'unknown'}` (weights fingerprint `{base.get('fingerprint', '?')}`)")
    if plan is not None:
        lines.append(f"- Method: `{plan.method}` ({plan.kind}); ratio target {plan.ratio_target:.4f}, "
                     f"achieved {plan.ratio_achieved:.4f} of the decoder blocks' parameters")
    if prov.get("sparsity_measured") is not None:
        from ..sparsity.apply import MODEL_MASKS_FILE

        where = f"; masks in `{MODEL_MASKS_FILE}`" if plan is not None and plan.masks else ""
        lines.append(f"- Sparsity of the pruned layers, measured on these weights: {prov['sparsity_measured']:.4f} "
                     f"(exact zeros{where})")
    p = prov["params"]
    lines.append(f"- Parameters: {p['unique']:,} total, {p['blocks']:,} in decoder blocks")
    widths = " widths" if prov["export"] in ("vanilla", "per-layer") else ""
    lines.append(f"- Export: {prov['export']}{widths}; loads with {prov['loads_with']}")
    columns, rows = measured_table(metrics or {})
    if rows:
        lines += ["", "## Measured", ""]
        lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in [columns, ["---"] * len(columns), *rows]]
    lines += ["", f"shearkit {prov['shearkit_version']}, {prov['created']}.", ""]
    return "\n".join(lines)
