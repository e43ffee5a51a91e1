"""Read back a GGUF file shearkit wrote (any of its architectures, `deci` included), as the
transformers model it came from, so `eval` and `bench` run on it.

transformers' own GGUF reader does not know `deci`; this one rebuilds the model from the file's
(per-layer) sizes, dequantises the tensors to float32 and undoes the q/k row reordering.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from ..errors import ShearkitError
from .gguf_export import MODEL_TYPE_KEY, ROTATED_PAIRS, SHEARKIT_KEY, gguf_name, rope_pairs
from .gguf_vocab import field_value, read_tokenizer


def is_shearkit_gguf(path: str | os.PathLike) -> bool:
    """True when a GGUF file was written by shearkit's exporter."""
    from gguf import GGUFReader

    return GGUFReader(str(path)).get_field(SHEARKIT_KEY) is not None


def _per_layer(value, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n


def load_shearkit_gguf(path: str | os.PathLike):
    """`(model, tokenizer)` from a GGUF file shearkit wrote: a float32 model in eval mode."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..surgery.sync import sync_block_attrs, sync_config
    from .remote_code import apply_layer_shapes

    reader = GGUFReader(str(path))
    arch = field_value(reader, "general.architecture")
    model_type = field_value(reader, MODEL_TYPE_KEY)
    if field_value(reader, SHEARKIT_KEY) is None or model_type is None:
        raise ShearkitError(f"{path} was not written by shearkit's GGUF exporter; shearkit reads other GGUF files "
                            "with transformers (which does not know 'deci').")
    get = lambda key: field_value(reader, f"{arch}.{key}")  # noqa: E731
    n = int(get("block_count"))
    heads, kv, ff = (_per_layer(get(k), n) for k in ("attention.head_count", "attention.head_count_kv",
                                                     "feed_forward_length"))
    head_dim = int(get("attention.key_length"))
    tensors = {t.name: t for t in reader.tensors}
    tok = read_tokenizer(reader)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=int(get("vocab_size")), hidden_size=int(get("embedding_length")),
        intermediate_size=ff[0], num_hidden_layers=n, num_attention_heads=heads[0], num_key_value_heads=kv[0],
        head_dim=head_dim, max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(get("rope.freq_base"))},
        tie_word_embeddings="output.weight" not in tensors, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.name_or_path = str(path)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, trust_remote_code=False)
    shapes = [{"modules": {"self_attn.q_proj": [heads[i] * head_dim, cfg.hidden_size],
                           "self_attn.k_proj": [kv[i] * head_dim, cfg.hidden_size],
                           "self_attn.v_proj": [kv[i] * head_dim, cfg.hidden_size],
                           "self_attn.o_proj": [cfg.hidden_size, heads[i] * head_dim],
                           "mlp.gate_proj": [ff[i], cfg.hidden_size], "mlp.up_proj": [ff[i], cfg.hidden_size],
                           "mlp.down_proj": [cfg.hidden_size, ff[i]]}, "attrs": {}} for i in range(n)]
    apply_layer_shapes(model, SimpleNamespace(shearkit_layer_shapes={"layers_path": "model.layers", "layers": shapes}))
    state = {}
    for name, ref in model.state_dict().items():
        key = gguf_name(name)
        if key is None or key not in tensors:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise ShearkitError(f"{path} lacks tensor {key or name} that a {model_type} model needs; the file is "
                                "damaged or not one shearkit wrote.")
        t = tensors[key]
        data = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))).copy())
        if data.shape != ref.shape:
            raise ShearkitError(f"{path}: tensor {key} has shape {tuple(data.shape)}, expected {tuple(ref.shape)}.")
        if arch in ROTATED_PAIRS and key.endswith(("attn_q.weight", "attn_k.weight")):
            i = int(key.split(".")[1])
            data = rope_pairs(data, heads[i] if "attn_q" in key else kv[i], inverse=True)
        state[name] = data
    model.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    sync_block_attrs(model)
    sync_config(model)  # per-layer widths recorded as shearkit does, so the model saves and loads again
    return model.eval(), tok

