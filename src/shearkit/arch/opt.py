"""OPT: separate q/k/v/out projections with biases, fc1/fc2 MLP with ReLU, LayerNorms."""
from __future__ import annotations

from .base import ArchAdapter, AttentionView, BlockView, MLPView, Proj
from .registry import register_adapter


@register_adapter
class OPTAdapter(ArchAdapter):
    family = "opt"
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    embed_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions")
    final_norm_path = "model.decoder.final_layer_norm"
    width_config_keys = {"heads": "num_attention_heads", "mlp": "ffn_dim"}

    def block_view(self, i: int) -> BlockView:
        name = self.block_name(i)
        block = self.layers[i]
        at = block.self_attn
        head_dim = at.head_dim
        heads = at.q_proj.weight.shape[0] // head_dim
        p = lambda sub: Proj(f"{name}.{sub}", block.get_submodule(sub))  # noqa: E731
        attn = AttentionView(at, p("self_attn.q_proj"), p("self_attn.k_proj"), p("self_attn.v_proj"),
                             p("self_attn.out_proj"), heads, heads, head_dim)
        mlpv = MLPView(block, [p("fc1")], p("fc2"))  # OPT's MLP lives directly in the block
        return BlockView(i, name, block, attn, mlpv, [block.self_attn_layer_norm, block.final_layer_norm])

    @property
    def final_norm(self):
        # OPT-350m style models with do_layer_norm_before=False have no final norm
        return getattr(self.model.model.decoder, "final_layer_norm", None)
