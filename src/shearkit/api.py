"""The Python API: load, evaluate, bench, generate, export to GGUF. The CLI is a thin layer over these."""
from __future__ import annotations

import os
from typing import Any, Iterable

from .data import DATASETS
from .errors import ShearkitError
from .models import load

PPL_TASKS = tuple(name for name, ds in DATASETS.items() if ds.kind in ("eval", "text"))


def check_tasks(tasks: Iterable[str] | str, data_dir: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """Split task names into perplexity sets and zero-shot tasks, refusing unknown names early
    (before a model is loaded)."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    ppl_tasks = [t for t in tasks if t in PPL_TASKS or t.endswith((".txt", ".jsonl"))]
    zs_tasks = [t for t in tasks if t not in ppl_tasks]
    if zs_tasks:
        try:
            from .eval.zeroshot import check_tasks as check_zeroshot
        except ModuleNotFoundError:
            raise ShearkitError(f"Unknown task(s) {', '.join(zs_tasks)}: zero-shot tasks are not available in this "
                                f"installation; name a perplexity set ({', '.join(PPL_TASKS)}) or a .txt/.jsonl "
                                "file.") from None
        check_zeroshot(zs_tasks, data_dir=data_dir)
    return ppl_tasks, zs_tasks


def evaluate(model, tokenizer, tasks: Iterable[str] | str = ("wikitext2",), *, seqlen: int = 2048,
             limit: int | None = None, batch_size: int | str = "auto", split: str | None = None,
             data_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """Evaluate a model: perplexity sets by the concatenated protocol, other names as zero-shot tasks.

    `batch_size`: windows (requests) per forward pass, or `auto`: 1 on the CPU, on an accelerator the
    largest that fits in memory (perplexity: `eval.perplexity.perplexity`; zero-shot: lm-eval's own `auto`).

    Returns task -> record; each record has `metric` and `value` plus the protocol it was measured with.
    """
    ppl_tasks, zs_tasks = check_tasks(tasks, data_dir)
    results: dict[str, dict] = {}
    from .eval.perplexity import perplexity

    for t in ppl_tasks:
        r = perplexity(model, tokenizer, t, split=split, seqlen=seqlen, batch_size=batch_size, limit=limit,
                       data_dir=data_dir)
        results[t] = {"value": r["ppl"], **r}
    if zs_tasks:
        from .eval.zeroshot import zeroshot

        results.update(zeroshot(model, tokenizer, zs_tasks, limit=limit, batch_size=batch_size, data_dir=data_dir))
    return results


def bench(model, *others, labels: list[str] | None = None, paths: list[str | None] | None = None,
          **kwargs: Any) -> dict[str, dict]:
    """Speed, size and peak memory of one model, or of several measured in turn (each in its own child
    process); with two, `ratios` reads as the first over the second (the baseline).

    Models are objects or names/directories (loaded in their child with `device`, `dtype`, `cache_dir`).
    """
    from .eval.speed import benchmark
    from .models.builtin import BUILTINS, builtin_path

    models = [model, *others]
    labels = labels or [m if isinstance(m, str) else f"model{i}" for i, m in enumerate(models)]
    if len(set(labels)) != len(labels):
        labels = [f"{l}#{i}" for i, l in enumerate(labels)]
    if paths is None:
        paths = [str(builtin_path(m, kwargs.get("cache_dir"))) if isinstance(m, str) and m in BUILTINS
                 else str(m) if isinstance(m, (str, os.PathLike)) else None for m in models]
    return benchmark(dict(zip(labels, models)), paths=dict(zip(labels, paths)), **kwargs)


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, chat: bool | None = None) -> str:
    """Greedy completion of `prompt`; instruct models (those with a chat template) get it applied."""
    import torch

    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def export_gguf(model, out: str | os.PathLike, *, tokenizer=None, outtype: str = "f16",
                overwrite: bool = False) -> dict[str, Any]:
    """Write a Llama-family model as one GGUF file llama.cpp runs (per-layer widths as `deci`).

    `model` is a model directory, a built-in name, or a model object (then give `tokenizer`).
    Returns what was written: architecture, per-layer sizes, tensors that q8_0 left in f16.
    """
    from .io.gguf_export import export_gguf as _export, export_gguf_dir
    from .models.builtin import BUILTINS, builtin_path

    if isinstance(model, (str, os.PathLike)):
        src = builtin_path(str(model)) if str(model) in BUILTINS else model
        return export_gguf_dir(src, out, outtype=outtype, overwrite=overwrite).as_dict()
    if tokenizer is None:
        raise ShearkitError("export_gguf needs the tokenizer with a model object (its vocabulary goes in the file).")
    return _export(model, tokenizer, out, outtype=outtype, overwrite=overwrite).as_dict()


__all__ = ["load", "evaluate", "check_tasks", "bench", "generate", "export_gguf"]
