"""A (pruned) Llama-family model as one GGUF file that llama.cpp runs natively, written atomically.

Uniform widths give llama.cpp's ordinary architecture (`llama` for Llama and Mistral, `qwen2`);
per-layer widths (head counts, KV heads, MLP widths differing by layer) give `deci`, whose
`feed_forward_length`, `attention.head_count` and `attention.head_count_kv` are per-layer arrays
and which builds every layer with its own sizes; fewer layers (ShortGPT) are just fewer blocks.
`llama` and `deci` rotate adjacent pairs of q/k rows where transformers rotates the two halves
of each head, so q and k rows are reordered (`rope_pairs`) to give identical attention. What
llama.cpp cannot express is refused, naming the layer and the reason, never written wrongly:
families other than the Llama family, FlexiGPT's shared blocks, biases it would not apply, a
`deci` layer without MLP (its graph then also drops the attention residual) or without heads,
RoPE scaling, sparse compressed folders.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ShearkitError

OUTTYPES = ("f32", "f16", "q8_0")
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type -> llama.cpp
ROTATED_PAIRS = ("llama", "deci")  # llama.cpp architectures whose RoPE pairs adjacent rows (q/k reordered)
Q8_BLOCK = 32  # q8_0 quantises rows in blocks of this many values
SHEARKIT_KEY = "shearkit.version"
MODEL_TYPE_KEY = "shearkit.model_type"

# transformers tensor name (inside a block, or top level) -> GGUF tensor name
_BLOCK_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
                "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


@dataclass
class LayerGeometry:
    """One block's sizes as llama.cpp reads them."""

    heads: int
    kv_heads: int
    ff: int


@dataclass
class GGUFExport:
    """What `export_gguf` wrote: the file, llama.cpp's architecture, per-layer sizes, the outtype,
    and the tensors written as f16 because q8_0 could not hold them (rows not a multiple of 32)."""

    path: Path
    architecture: str
    outtype: str
    layers: list[LayerGeometry]
    head_dim: int
    tensors: int
    f16_fallback: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "architecture": self.architecture, "outtype": self.outtype,
                "layers": len(self.layers), "heads": [g.heads for g in self.layers],
                "kv_heads": [g.kv_heads for g in self.layers], "ff": [g.ff for g in self.layers],
                "head_dim": self.head_dim, "tensors": self.tensors, "f16_fallback": self.f16_fallback,
                "notes": self.notes}


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of a transformers Llama-family tensor (None: not exported)."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    prefix, _, rest = hf_name.partition("model.layers.")
    if prefix or not rest:
        return None
    idx, _, sub = rest.partition(".")
    return f"blk.{idx}.{_BLOCK_NAMES[sub]}" if sub in _BLOCK_NAMES else None


def rope_pairs(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Reorder each head's rows from transformers' half-split RoPE layout (row i pairs with i + d/2)
    to llama.cpp's adjacent pairs (2i, 2i+1); `inverse` undoes it."""
    d = w.shape[0] // n_heads
    if inverse:
        return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope(config) -> tuple[float, str]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), str(params.get("rope_type") or params.get("type") or "default")


def check_family(model) -> str:
    """The model's transformers model_type when GGUF export takes its family; else ShearkitError."""
    from ..arch.modules import unwrap

    mtype = getattr(unwrap(model).config, "model_type", None)
    if mtype not in GGUF_ARCH:
        raise ShearkitError(f"GGUF export supports the Llama family ({', '.join(GGUF_ARCH)}); this model is "
                            f"'{mtype}'. Save it as a Hugging Face directory instead (--save-format dense).")
    return mtype


def plan_layout(model) -> tuple[str, list[LayerGeometry], int, list[str]]:
    """llama.cpp's architecture, per-layer sizes and head size for `model`, plus notes; raises
    ShearkitError naming the layer and reason for what llama.cpp cannot express."""
    from ..arch import get_adapter
    from ..surgery.shared_block import has_shared_blocks

    cfg = model.config
    mtype = check_family(model)
    if has_shared_blocks(model):
        raise ShearkitError("This model has FlexiGPT weight-shared blocks (shared weights, adapters and output "
                            "norms), which neither llama nor deci in llama.cpp can express; GGUF export refuses it.")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ShearkitError(f"llama.cpp's {mtype} uses SiLU; this model's hidden_act is '{cfg.hidden_act}'.")
    theta, rope_type = _rope(cfg)
    if rope_type != "default":
        raise ShearkitError(f"RoPE scaling '{rope_type}' is not exported to GGUF by shearkit; only plain RoPE.")
    notes = []
    if mtype == "mistral" and getattr(cfg, "sliding_window", None):
        notes.append(f"llama.cpp ignores Mistral's sliding window ({cfg.sliding_window}): outputs agree on "
                     "contexts up to that length")
    views = get_adapter(model).blocks()
    head_dim = views[0].attn.head_dim
    geo = []
    for b in views:
        a, name = b.attn, f"layer {b.index} ({b.name})"
        if a.num_heads == 0:
            raise ShearkitError(f"{name} has no attention heads left; shearkit does not export attention-free "
                                "layers to GGUF. Prune with a floor of at least one head per layer.")
        if b.mlp.width == 0:
            raise ShearkitError(f"{name} has no MLP channels left; llama.cpp's deci drops such a layer's "
                                "attention residual too, so the file would compute something else. Keep at "
                                "least one MLP channel per layer.")
        if a.head_dim != head_dim or a.v.out_features != a.num_kv_heads * head_dim:
            raise ShearkitError(f"{name} has a head size other than layer 0's {head_dim}; llama.cpp needs one "
                                "head size for q, k and v in every layer.")
        allowed = ("q", "k", "v") if mtype == "qwen2" else ()
        for proj in (a.q, a.k, a.v, a.o, *b.mlp.inputs, b.mlp.output):
            short = proj.name.rsplit(".", 1)[-1][0]
            if proj.bias is not None and short not in allowed:
                raise ShearkitError(f"{name}: {proj.name} has a bias, which llama.cpp's {GGUF_ARCH[mtype]} "
                                    "does not apply; GGUF export refuses rather than drop it.")
        geo.append(LayerGeometry(a.num_heads, a.num_kv_heads, b.mlp.width))
    uniform = all(g == geo[0] for g in geo)
    if uniform:
        return GGUF_ARCH[mtype], geo, head_dim, notes
    if mtype == "qwen2":
        odd = next(i for i, g in enumerate(geo) if g != geo[0])
        raise ShearkitError(f"layer {odd} has other widths than layer 0 ({geo[odd]} vs {geo[0]}): per-layer "
                            "widths need llama.cpp's deci architecture, which has no q/k/v biases for Qwen2 "
                            "(nor its RoPE layout). Prune Qwen2 with uniform widths to export it to GGUF.")
    return "deci", geo, head_dim, notes


def _encode(name: str, w: torch.Tensor, outtype: str, fallback: list[str]):
    """A tensor as (numpy data, GGML type): 1-D tensors stay f32; matrices take the outtype, q8_0
    falling back to f16 when rows are not a multiple of 32 (recorded in `fallback`)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    data = w.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or outtype == "f32":
        return data, Q.F32
    if outtype == "q8_0":
        if data.shape[-1] % Q8_BLOCK == 0:
            return quantize(data, Q.Q8_0), Q.Q8_0
        fallback.append(name)
    return data.astype(np.float16), Q.F16


def export_gguf(model, tokenizer, out: str | os.PathLike, outtype: str = "f16",
                overwrite: bool = False) -> GGUFExport:
    """Write `model` and `tokenizer` to the GGUF file `out` (atomically) for llama.cpp.

    Returns what was written (`GGUFExport`); raises ShearkitError before writing anything for a
    model or tokenizer llama.cpp cannot run identically (see the module doc).
    """
    import copy

    import gguf

    from .._version import __version__
    from ..arch.modules import unwrap
    from .atomic import atomic_file
    from .gguf_vocab import add_vocab, vocab_fields

    if outtype not in OUTTYPES:
        raise ShearkitError(f"--outtype must be one of {', '.join(OUTTYPES)}, got '{outtype}'.")
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise ShearkitError(f"The GGUF output must end in .gguf, got {out}.")
    if out.exists() and not overwrite:
        raise ShearkitError(f"{out} already exists; choose another path or pass --overwrite.")
    m = unwrap(model)
    if m is not model:  # peft: merge LoRA into a copy, as `save` does
        m = copy.deepcopy(model).merge_and_unload()
    arch, geo, head_dim, notes = plan_layout(m)
    cfg = m.config
    state = m.state_dict()
    embed = state["model.embed_tokens.weight"]
    vocab = vocab_fields(tokenizer, embed.shape[0])
    tied = "lm_head.weight" not in state or state["lm_head.weight"].data_ptr() == embed.data_ptr()
    theta, _ = _rope(cfg)
    fallback: list[str] = []
    n_tensors = 0
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(Path(str(getattr(cfg, "name_or_path", "") or "model")).name or "model")
        w.add_string(SHEARKIT_KEY, __version__)
        w.add_string(MODEL_TYPE_KEY, cfg.model_type)
        w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
        w.add_embedding_length(int(embed.shape[1]))
        w.add_block_count(len(geo))
        per_layer = arch == "deci"
        w.add_feed_forward_length([g.ff for g in geo] if per_layer else geo[0].ff)
        w.add_head_count([g.heads for g in geo] if per_layer else geo[0].heads)
        w.add_head_count_kv([g.kv_heads for g in geo] if per_layer else geo[0].kv_heads)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(int(embed.shape[0]))
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        add_vocab(w, vocab)
        for hf, t in state.items():
            name = gguf_name(hf)
            if name is None or (name == "output.weight" and tied):
                continue
            if arch in ROTATED_PAIRS and name.endswith(("attn_q.weight", "attn_k.weight")):
                g = geo[int(name.split(".")[1])]
                t = rope_pairs(t, g.heads if "attn_q" in name else g.kv_heads)
            data, qtype = _encode(name, t, outtype, fallback)
            w.add_tensor(name, data, raw_dtype=qtype)
            n_tensors += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    if fallback:
        warnings.warn(f"q8_0 needs rows in multiples of {Q8_BLOCK}: {len(fallback)} tensor(s) written as f16 "
                      f"instead ({', '.join(fallback[:4])}{' ...' if len(fallback) > 4 else ''}); prune with --round-to 32 "
                      "to keep every width quantisable.", stacklevel=2)
    return GGUFExport(out, arch, outtype, geo, head_dim, n_tensors, fallback, notes)


def export_gguf_dir(model_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16",
                    overwrite: bool = False) -> GGUFExport:
    """Export a saved model directory (shearkit's or any Llama-family one) to a GGUF file; the
    directory is only read."""
    from ..models.loading import load
    from .sparse_export import is_compressed
    from .weights import read_config

    src = Path(model_dir).expanduser()
    if not (src / "config.json").is_file():
        raise ShearkitError(f"{src} is not a model directory (no config.json); give a folder written by "
                            "`shearkit prune` / `shearkit.save`.")
    if is_compressed(read_config(src)):
        raise ShearkitError(f"{src} is a compressed-tensors sparse model; GGUF has no sparse layout for it. "
                            "Export the dense model instead (save it with --save-format dense).")
    model, tok = load(src, device="cpu", dtype="float32")
    return export_gguf(model, tok, out, outtype=outtype, overwrite=overwrite)
