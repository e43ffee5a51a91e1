"""`shearkit.load`: one entry point for hub ids, local directories, GGUF files and built-ins."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..device import resolve_device, resolve_dtype
from ..errors import ShearkitError
from .builtin import BUILTINS, builtin_path

BUILTIN_MODELS = tuple(BUILTINS)


def load(
    name_or_path: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    lazy: bool = False,
    max_memory: str | int | None = None,
    work_dir: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a built-in name (`smollm2-135m`), a local model directory, a `.gguf`
            file (dequantised), or a Hugging Face hub id (needs hub access).
        device: `auto`, `cpu`, `cuda` or `cuda:N`.
        dtype: `auto` (float32 on CPU, bfloat16 on CUDA), `float32`, `bfloat16` or `float16`.
        cache_dir: where built-in models are cached (default $SHEARKIT_CACHE or ~/.cache/shearkit).
        trust_remote_code: passed to transformers; off unless asked for.
        lazy: keep the decoder blocks in their safetensors files and load one at a time when used
            (`io.lazy`: for models larger than memory; a model directory or a built-in).
        max_memory: memory the weights may take (bytes, or "8GB", "500MiB"): a model that fits is loaded
            whole, a larger one lazily; one whose stem and largest block do not fit is refused.
        work_dir: where a lazy model keeps the blocks it changes (default: a temporary folder).

    Returns:
        `(model, tokenizer)` with the model in eval mode on the chosen device.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if lazy or max_memory is not None:
        source = builtin_path(name, cache_dir) if name in BUILTINS else path
        if not source.is_dir():
            raise ShearkitError(f"{name} is not a model directory or a built-in name; --lazy and --max-memory load "
                                "safetensors model directories (save a GGUF or hub model with shearkit first).")
        from ..io.lazy import load_lazy, needs_lazy

        if lazy or needs_lazy(source, torch_dtype, max_memory):
            model = load_lazy(source, device=dev, dtype=torch_dtype, work_dir=work_dir)
            if name in BUILTINS:
                model.config.name_or_path = name
            tok = _load_tokenizer(source, trust_remote_code)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            return model, tok
    if name in BUILTINS:
        cached = builtin_path(name, cache_dir)
        try:
            model, tok = _load_dir(cached, torch_dtype, trust_remote_code)
        except ShearkitError as e:  # e.g. a damaged cache: say how to rebuild it
            raise ShearkitError(f"{e} (This is the cache of the built-in '{name}': delete {cached} and shearkit "
                                "rebuilds it on the next load.)") from None
        model.config.name_or_path = name
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ShearkitError(f"GGUF file not found: {path}")
        from ..io.gguf_load import is_shearkit_gguf, load_shearkit_gguf

        # shearkit's own files (deci included, which transformers cannot read) come back as written
        model, tok = load_shearkit_gguf(path) if is_shearkit_gguf(path) else load_gguf(path)
        model = model.to(torch_dtype)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise ShearkitError(f"{path} is a directory but holds no config.json: not a model directory.")
        model, tok = _load_dir(path, torch_dtype, trust_remote_code)
    elif path.exists():
        raise ShearkitError(f"{path} is a file but not a .gguf model; give a model directory, a .gguf file, "
                            f"a hub id or a built-in name ({', '.join(BUILTINS)}).")
    else:
        model, tok = _load_hub(name, torch_dtype, trust_remote_code)
    model = model.to(dev).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _load_dir(path: Path, torch_dtype, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM

    from ..io.modeling import load_shearkit_model, needs_modeling_file
    from ..io.sparse_export import is_compressed, load_compressed_model
    from ..io.weights import check_weight_files, read_config

    config = read_config(path)
    weights = check_weight_files(path)  # a damaged file is named here, not deep inside transformers
    if not weights:
        raise ShearkitError(f"{path} holds no .safetensors weights; shearkit loads safetensors only (never "
                            "pickled .bin files). Convert the checkpoint to safetensors first.")
    try:
        if is_compressed(config):  # written with --save-format compressed-tensors: decompress
            model = load_compressed_model(path, torch_dtype, trust_remote_code=trust_remote_code)
        elif needs_modeling_file(config) and not trust_remote_code:
            model = load_shearkit_model(path, torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                         use_safetensors=True)
    except (ShearkitError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types (strict config checks, sizes, names)
        raise ShearkitError(f"Cannot build the model of {path} from its config.json ({_brief(e)}). Fix that "
                            "value, or re-save or re-download the model.") from e  # the cause kept for a bug of ours
    return model, _load_tokenizer(path, trust_remote_code)


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - missing files, or a config.json (read again here) it cannot take
        raise ShearkitError(f"transformers cannot load the tokenizer of {path} ({_brief(e)}); check its config.json "
                            "and tokenizer files, or save the model's tokenizer beside it "
                            "(tokenizer.save_pretrained).") from None


def _brief(e: BaseException, limit: int = 1000) -> str:
    """`Type: message` on one line, cut to a readable length."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _load_hub(name: str, torch_dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ShearkitError(
            f"Could not load '{name}': it is not a built-in name ({', '.join(BUILTINS)}), not an existing "
            f"local path, and the hub did not provide it ({str(e).splitlines()[0][:200]}). "
            "Give a local model directory or .gguf file, or check hub access."
        ) from None
    return model, tok


def load_gguf(path: str | os.PathLike):
    """Load a GGUF file dequantised to float32, as a model that can be saved and pruned.

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the weights are moved
    into a fresh model built from the same config without its `quantization_config`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    # the GGUF file's own architectures only: never code from the folder it sits in
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(path)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise RuntimeError(f"internal error, please report it: the GGUF conversion of {path} left weights "
                           f"unmatched: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.tie_weights()
    return model.eval(), tok


def _tied_keys(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if not isinstance(keys, dict) else set(keys.keys())
