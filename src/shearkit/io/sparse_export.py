"""Saving sparse models: dense safetensors with zeros, or the compressed-tensors sparse layout.

- `save_dense`: an ordinary `save_pretrained` folder. Loads anywhere; the zeros take full space.
- `save_compressed`: the compressed-tensors "sparse-bitmask" layout (per linear module `<m>`:
  `<m>.compressed` non-zero values, `<m>.bitmask` bit-packed mask, `<m>.row_offsets`,
  `<m>.shape`) or, when every sparsified weight is 2:4 along its input axis, "sparse-24-bitmask"
  (values (rows, cols/2) plus the packed mask), with the `quantization_config.sparsity_config`
  block in config.json that marks the model for vLLM.
  Bits are packed with compressed-tensors' own `pack_bitmasks` and read back with its
  `unpack_bitmasks`, and the config block is built from its `BitmaskConfig` /
  `Sparse24BitMaskConfig` classes.

Note on versions: compressed-tensors 0.15+ (0.20 is installed) keeps these config classes and
bit helpers but dropped the sparse compressors themselves (and transformers' loader no longer
decompresses them: it loads such a folder with those weights newly initialised), so
`load_compressed_model` here performs the decompression, and `shearkit.load` uses it for every
folder whose config carries a compressed-tensors `sparsity_config`. The layout is the one
compressed-tensors <= 0.14 writes and vLLM versions of that era load; tests check it both ways
against compressed-tensors 0.13's own compressor and decompressor, run from a side folder.

- `to_semi_structured`: on CUDA, turn 2:4 linear weights into PyTorch semi-structured sparse
  tensors (`torch.sparse.to_sparse_semi_structured`) for the sparse tensor-core kernels.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ShearkitError
from .atomic import atomic_dir

FORMATS = ("auto", "sparse-bitmask", "sparse-24-bitmask")
READ_FORMATS = ("sparse-bitmask", "sparse-24-bitmask", "dense")  # "dense": zeros stored as they are
_PARAMS = ("shape", "compressed", "bitmask", "row_offsets")


def save_dense(model, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save as an ordinary safetensors folder (zeros stored densely)."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def sparse_targets(model) -> list[str]:
    """Full names of the decoder blocks' linear modules (what the sparsity methods prune)."""
    from ..arch import get_adapter
    from ..sparsity.layers import block_linears

    return [r.name for v in get_adapter(model).blocks() for r in block_linears(v).values()]


def is_24(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive entries of each row has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def compress_weight(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """One dense weight -> its compressed tensors (keys: shape, compressed, bitmask[, row_offsets])."""
    from compressed_tensors.utils.helpers import pack_bitmasks

    w = w.detach().cpu().contiguous()
    keep = w != 0
    if fmt == "sparse-24-bitmask":
        if not is_24(w):
            raise ShearkitError("sparse-24-bitmask needs every weight to be 2:4 sparse along its inputs.")
        # pad each group of 4 to exactly two stored values (a group may hold fewer non-zeros)
        groups = keep.reshape(w.shape[0], -1, 4)
        need = 2 - groups.sum(-1, keepdim=True)
        extra = (~groups).cumsum(-1) <= need
        keep = (groups | (~groups & extra)).reshape(w.shape)
        return {"shape": torch.tensor(list(w.shape)).reshape(-1, 1),
                "compressed": w[keep].reshape(w.shape[0], w.shape[1] // 2),
                "bitmask": pack_bitmasks(keep)}
    counts = keep.sum(-1)
    return {"shape": torch.tensor(list(w.shape)), "compressed": w[keep], "bitmask": pack_bitmasks(keep),
            "row_offsets": torch.cumsum(counts, 0) - counts}


def decompress_weight(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of `compress_weight`, using compressed-tensors' `unpack_bitmasks`."""
    from compressed_tensors.utils.helpers import unpack_bitmasks

    shape = [int(v) for v in parts["shape"].flatten().tolist()]
    keep = unpack_bitmasks(parts["bitmask"], shape)
    out = torch.zeros(shape, dtype=parts["compressed"].dtype)
    out[keep] = parts["compressed"].flatten()
    return out


def save_compressed(model, tokenizer, out: str | os.PathLike, fmt: str = "auto", overwrite: bool = False,
                    plan=None) -> Path:
    """Save with the decoder's linear weights in a compressed-tensors sparse layout.

    Args:
        fmt: "auto" (2:4 layout when every target weight is 2:4, else bitmask),
            "sparse-bitmask" or "sparse-24-bitmask".
        plan: the plan that made the model; when given, it is written beside the weights
            (plan.json, its masks in sparsity/masks.safetensors) so the saved model records how
            it was pruned.
    """
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..sparsity.apply import MODEL_MASKS_FILE, check_plan_zeros
    from .weights import weight_files

    if fmt not in FORMATS:
        raise ShearkitError(f"Unknown sparse format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    if plan is not None:
        check_plan_zeros(model, plan)
    targets = sparse_targets(model)
    weights = {f"{t}.weight": model.get_submodule(t).weight for t in targets}
    if fmt == "auto":
        fmt = "sparse-24-bitmask" if all(is_24(w) for w in weights.values()) else "sparse-bitmask"
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    structure = "2:4" if fmt == "sparse-24-bitmask" else "unstructured"
    cfg_cls = Sparse24BitMaskConfig if fmt == "sparse-24-bitmask" else BitmaskConfig
    scfg = cfg_cls(targets=targets, ignore=[], global_sparsity=zeros / max(total, 1), sparsity_structure=structure)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        index_file = tmp / "model.safetensors.index.json"
        index = json.loads(index_file.read_text()) if index_file.exists() else None
        for shard in weight_files(tmp):
            tensors, meta = {}, None
            with safe_open(str(shard), "pt") as f:
                meta = f.metadata()
                for key in f.keys():
                    t = f.get_tensor(key)
                    if key in weights:  # stored under the module's name: `<module>.compressed`, ...
                        module = key[: -len(".weight")]
                        for p, v in compress_weight(t, fmt).items():
                            tensors[f"{module}.{p}"] = v
                            if index is not None:
                                index["weight_map"][f"{module}.{p}"] = shard.name
                        if index is not None:
                            index["weight_map"].pop(key, None)
                    else:
                        tensors[key] = t
            save_file(tensors, str(shard), metadata=meta)
        if index is not None:
            index_file.write_text(json.dumps(index, indent=2))
        cfg_file = tmp / "config.json"
        config = json.loads(cfg_file.read_text())
        config["quantization_config"] = {"version": ct_version, "quant_method": "compressed-tensors",
                                         "sparsity_config": scfg.model_dump(), "transform_config": {}}
        cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        if plan is not None:  # with its masks, in a sub-folder that weight loaders do not read
            plan.save(tmp / "plan.json", masks_file=MODEL_MASKS_FILE)
    return Path(out)


def is_compressed(config: dict) -> bool:
    """True when a config.json (as a dict) marks a compressed-tensors sparse model."""
    q = config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "compressed-tensors" and bool(q.get("sparsity_config"))


def decompress_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a folder written by `save_compressed` back into a dense state dict."""
    from safetensors import safe_open

    from .weights import check_weight_files

    raw: dict[str, torch.Tensor] = {}
    for shard in check_weight_files(path):
        with safe_open(str(shard), "pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        module, _, last = k.rpartition(".")
        if last in _PARAMS:
            grouped.setdefault(f"{module}.weight", {})[last] = v
        else:
            dense[k] = v
    for name, parts in grouped.items():
        dense[name] = decompress_weight(parts)
    return dense


def load_compressed_model(path: str | os.PathLike, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """The model of a compressed-tensors sparse folder, decompressed to dense weights (zeros where
    the bitmasks say), on the CPU in eval mode. `dtype` None keeps the stored weights' dtype;
    `trust_remote_code` (off unless asked for) lets transformers run the folder's own config and model code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .weights import read_config

    path = Path(path)
    cfg_data = read_config(path)
    if not is_compressed(cfg_data):
        raise ShearkitError(f"{path} has no compressed-tensors sparsity_config; load it with shearkit.load.")
    if not isinstance(cfg_data["quantization_config"]["sparsity_config"], dict):
        raise ShearkitError(f"{path}/config.json is damaged: quantization_config.sparsity_config must be an object; "
                            "re-save the model.")
    if cfg_data["quantization_config"].get("config_groups"):
        raise ShearkitError(f"{path} is a quantized compressed-tensors model; shearkit reads only the sparse "
                            "layouts (sparse-bitmask, sparse-24-bitmask) without quantization.")
    fmt = cfg_data["quantization_config"]["sparsity_config"].get("format")
    if fmt not in READ_FORMATS:
        raise ShearkitError(f"{path} uses the compressed-tensors format '{fmt}'; shearkit reads "
                            f"{', '.join(READ_FORMATS)}.")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    sd = decompress_state_dict(path)
    if dtype is None:
        floats = [t.dtype for t in sd.values() if t.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else torch.float32  # the weights' own dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    model.tie_weights()
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise ShearkitError(f"{path} does not match its config: missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}.")
    model.config.name_or_path = str(path)
    return model.eval()


def load_compressed(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False):
    """Load a model saved by `save_compressed` (decompressed to dense weights) and its tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    model = load_compressed_model(path, dtype, trust_remote_code)
    tok = (AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
           if (path / "tokenizer_config.json").exists() else None)
    return model.to(device).eval(), tok


def to_semi_structured(model) -> int:
    """Replace every 2:4 decoder linear weight by a semi-structured sparse tensor (CUDA only).

    The weights must be float16/bfloat16 on a CUDA device with sparse tensor cores (sm80+).
    Returns the number of weights converted. Measure before claiming a speed-up: small
    matrices are often slower than dense.
    """
    from torch.sparse import to_sparse_semi_structured

    converted = 0
    for name in sparse_targets(model):
        mod = model.get_submodule(name)
        w = mod.weight
        if not isinstance(mod, torch.nn.Linear) or w.device.type != "cuda" or not is_24(w):
            continue
        if w.dtype not in (torch.float16, torch.bfloat16):
            raise ShearkitError("Semi-structured sparse tensors need float16 or bfloat16 weights; load with --dtype bfloat16.")
        mod.weight = torch.nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
        converted += 1
    if not converted:
        raise ShearkitError("No 2:4-sparse linear weight on a CUDA device was found to convert.")
    return converted
