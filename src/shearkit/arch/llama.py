"""Llama family: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3, SmolLM — separate q/k/v/o, gated MLP."""
from __future__ import annotations

from .base import ArchAdapter, AttentionView, BlockView, MLPView, Proj
from .registry import register_adapter


@register_adapter
class LlamaAdapter(ArchAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layers_path = "model.layers"
    embed_paths = ("model.embed_tokens",)
    final_norm_path = "model.norm"
    width_config_keys = {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "mlp": "intermediate_size"}

    def sync_geometry_config(self) -> None:
        first = self.block_view(0)
        self.config.head_dim = first.attn.head_dim  # explicit: hidden // heads no longer holds
        self.config.hidden_size = first.norms[0].weight.shape[0]  # changed by hidden-channel pruning

    def block_view(self, i: int) -> BlockView:
        name = self.block_name(i)
        block = self.layers[i]
        at, mlp = block.self_attn, block.mlp
        head_dim = getattr(at, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        heads = at.q_proj.weight.shape[0] // head_dim  # read from the weights: pruned layers differ
        kv_heads = at.k_proj.weight.shape[0] // head_dim
        p = lambda sub: Proj(f"{name}.{sub}", block.get_submodule(sub))  # noqa: E731
        attn = AttentionView(at, p("self_attn.q_proj"), p("self_attn.k_proj"), p("self_attn.v_proj"),
                             p("self_attn.o_proj"), heads, kv_heads, head_dim)
        mlpv = MLPView(mlp, [p("mlp.gate_proj"), p("mlp.up_proj")], p("mlp.down_proj"))
        return BlockView(i, name, block, attn, mlpv, [block.input_layernorm, block.post_attention_layernorm])
