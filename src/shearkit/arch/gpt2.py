"""GPT-2: Conv1D layers (weights stored transposed, (in, out)) and q/k/v fused in `c_attn`.

As in nanoGPT's `from_pretrained`, the transposition is the trap: every Proj here has
`transposed=True`, and q/k/v are row slices of the one fused (3*hidden, hidden) view.
"""
from __future__ import annotations

from .base import ArchAdapter, AttentionView, BlockView, MLPView, Proj
from .registry import register_adapter


@register_adapter
class GPT2Adapter(ArchAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    embed_paths = ("transformer.wte", "transformer.wpe")
    final_norm_path = "transformer.ln_f"
    width_config_keys = {"heads": "n_head", "mlp": "n_inner"}

    def block_view(self, i: int) -> BlockView:
        name = self.block_name(i)
        block = self.layers[i]
        at = block.attn
        head_dim = at.head_dim
        qkv_out = at.c_attn.weight.shape[1]  # Conv1D weight is (in, out)
        width = qkv_out // 3  # q, k and v have equal widths (no GQA in GPT-2)
        heads = width // head_dim
        cname = f"{name}.attn.c_attn"
        q, k, v = (Proj(cname, at.c_attn, True, j * width, width) for j in range(3))
        o = Proj(f"{name}.attn.c_proj", at.c_proj, True)
        attn = AttentionView(at, q, k, v, o, heads, heads, head_dim)
        mlp = block.mlp
        mlpv = MLPView(mlp, [Proj(f"{name}.mlp.c_fc", mlp.c_fc, True)], Proj(f"{name}.mlp.c_proj", mlp.c_proj, True))
        return BlockView(i, name, block, attn, mlpv, [block.ln_1, block.ln_2])
