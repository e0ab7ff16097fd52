"""Architecture specs: where the blocks, MLP and attention projections live, keyed by ``model_type``."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn

from kedit.core.errors import KeditError


class UnsupportedArchitecture(KeditError, ValueError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    """Module paths; ``{}`` in a per-block path is the block index."""

    blocks: str  # container of the transformer blocks
    mlp_in: str  # MLP input projection(s) (up projection)
    mlp_out: str  # MLP output projection; its input is the "key" locate-then-edit methods use
    attn_out: str  # attention output projection
    final_norm: str
    lm_head: str
    embed: str
    # a norm between the MLP's output projection and the residual stream (Gemma 2/3's post_feedforward_layernorm):
    # a change of the projection's output reaches the residual scaled by the norm's gain over the output's RMS
    mlp_post_norm: str | None = None

    def block(self, i: int) -> str:
        return f"{self.blocks}.{i}"

    def module_path(self, kind: str, layer: int) -> str:
        """Full dotted path of a per-block module (``kind`` is ``mlp_in``, ``mlp_out`` or ``attn_out``)."""
        return f"{self.block(layer)}.{getattr(self, kind)}"


_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    mlp_in="mlp.up_proj",
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
)

SPECS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        blocks="transformer.h",
        mlp_in="mlp.c_fc",
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
    ),
    "gptj": ArchSpec(
        blocks="transformer.h",
        mlp_in="mlp.fc_in",
        mlp_out="mlp.fc_out",
        attn_out="attn.out_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers",
        mlp_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",  # "embed_out" before transformers 5
        embed="gpt_neox.embed_in",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    # Gemma3ForCausalLM (text-only checkpoints such as gemma-3-270m)
    "gemma3_text": replace(_LLAMA_LIKE, mlp_post_norm="post_feedforward_layernorm"),
    # Gemma3ForConditionalGeneration: the language model sits under model.language_model
    "gemma3": ArchSpec(
        blocks="model.language_model.layers",
        mlp_in="mlp.up_proj",
        mlp_out="mlp.down_proj",
        attn_out="self_attn.o_proj",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        embed="model.language_model.embed_tokens",
        mlp_post_norm="post_feedforward_layernorm",
    ),
}


def spec_for(model: nn.Module) -> ArchSpec:
    """The spec for ``model.config.model_type``; a clear error listing what is supported otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SPECS:
        raise UnsupportedArchitecture(
            f"no architecture spec for model_type {model_type!r}; supported: {', '.join(sorted(SPECS))}"
        )
    return SPECS[model_type]


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} has no module {path!r} (model_type {model.config.model_type!r})"
        ) from e


def n_layers(model: nn.Module) -> int:
    return len(get_module(model, spec_for(model).blocks))
