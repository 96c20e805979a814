# Copyright 2026 The REAVL authors. Licensed under the Apache License, Version 2.0.
"""PyTorch REAVL: retrieval-based knowledge-augmented vision-language model.

Reading order (as in transformers' `modeling_clip.py`): loss helpers, output dataclasses, leaf modules (attention,
fusion layer, relevance gate, retrieval head), the `ReavlPreTrainedModel` base with all weight init, then the public
`ReavlModel` and `ReavlFor*` classes.

The architecture is this project's reconstruction of the REAVL paper's stated design (the paper's full text was not
available): composed transformers towers, a dense retriever whose query comes from the unimodal towers (so retrieval
runs before fusion), and fusion layers that cross-attend to the image patches and to the tokens of the retrieved
entries, each entry weighted by a learned relevance gate, the knowledge branch entering the residual stream through
a tanh gate.

This file is copied to the Hub by `save_pretrained` and imported as remote code: it imports only public names of
installed packages and its sibling `configuration_reavl` by relative import.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_reavl import ReavlConfig


# --------------------------------------------------------------------------------------------------------------------
# Loss helpers
# --------------------------------------------------------------------------------------------------------------------


def _distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0, keeping the local slice differentiable.

    Contrastive losses need every process's negatives (as open_clip's `gather_features` does); gradients flow
    only into the local slice, which is what DDP's gradient averaging expects.
    """
    rank, world_size = _distributed_world()
    if world_size == 1:
        return tensor
    gathered = [torch.zeros_like(tensor) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, tensor.contiguous())
    gathered[rank] = tensor
    return torch.cat(gathered, dim=0)


def contrastive_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` (rows: local queries, columns: global candidates) to `targets`."""
    return F.cross_entropy(logits, targets)


def multi_positive_contrastive_loss(logits: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """-log of the softmax mass on the positives, averaged over rows that have at least one positive."""
    log_probs = logits.log_softmax(dim=-1)
    positive_log_mass = torch.logsumexp(log_probs.masked_fill(~positive_mask, float("-inf")), dim=-1)
    has_positive = positive_mask.any(dim=-1)
    if not has_positive.any():
        return logits.sum() * 0.0
    return -positive_log_mass[has_positive].mean()


def soft_target_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on soft VQA targets, summed over answers and averaged over examples (as VQA models do)."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ReavlModelOutput(ModelOutput):
    r"""
    Output of [`ReavlModel`]. `K` is the number of knowledge entries per example (0 without knowledge).

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, text_length, text_hidden_size)`):
            Fused text states after the knowledge-augmented fusion layers.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, text_hidden_size)`):
            Fused state of the first ([CLS]) token.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised image ITC embedding.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised text ITC embedding (unimodal text tower).
        query_embeds (`torch.FloatTensor` of shape `(batch_size, retrieval_dim)`):
            L2-normalised retrieval query from the unimodal image and text towers.
        knowledge_embeds (`torch.FloatTensor` of shape `(batch_size, K, retrieval_dim)`):
            L2-normalised retrieval keys of the given entries, from the current knowledge encoder.
        retrieval_logits (`torch.FloatTensor` of shape `(batch_size, K)`):
            `query_embeds · knowledge_embeds`, differentiable (the retriever's scores under the current weights).
        knowledge_scores (`torch.FloatTensor` of shape `(batch_size, K)`):
            Retrieval scores used by the gates: the index's scores when given or retrieved, else `retrieval_logits`.
        knowledge_gate_logits (`torch.FloatTensor` of shape `(batch_size, K)`):
            Relevance (informativeness) logits of the entries.
        knowledge_gates (`torch.FloatTensor` of shape `(batch_size, K)`):
            `sigmoid(knowledge_gate_logits)`: how much each entry is let into the fusion.
        knowledge_indices (`torch.LongTensor` of shape `(batch_size, K)`, *optional*):
            Row numbers of the entries in the knowledge index, when they were retrieved by an attached retriever or
            passed in (map them to ids and titles with the retriever).
        image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_hidden_size)`):
            Unimodal vision tower states.
        text_hidden_states (`torch.FloatTensor` of shape `(batch_size, text_length, text_hidden_size)`):
            Unimodal text tower states.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    query_embeds: torch.FloatTensor | None = None
    knowledge_embeds: torch.FloatTensor | None = None
    retrieval_logits: torch.FloatTensor | None = None
    knowledge_scores: torch.FloatTensor | None = None
    knowledge_gate_logits: torch.FloatTensor | None = None
    knowledge_gates: torch.FloatTensor | None = None
    knowledge_indices: torch.LongTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None
    text_hidden_states: torch.FloatTensor | None = None


@dataclass
class ReavlForPreTrainingOutput(ModelOutput):
    r"""
    Output of [`ReavlForPreTraining`]. Every loss is a scalar, `None` when its targets were not given.

    Args:
        loss: weighted sum of the losses below.
        itc_loss: image-text contrastive loss (symmetric, gathered across processes).
        knowledge_alignment_loss: contrastive alignment of each pair's retrieval query with its weak-positive
            knowledge entries against every other entry in the (global) batch.
        mlm_loss: knowledge-augmented masked language modelling loss.
        itm_loss: knowledge-augmented image-text matching loss with hard negatives.
        kg_loss: KG relational reasoning (DistMult link prediction over the retrieved entries of the batch).
        retriever_loss: KL from the fusion model's relevance posterior to the retriever's distribution.
        relevance_loss: informative-knowledge identification (gate logits against weak-positive labels).
        logits_per_image (`(batch_size, global_batch_size)`): ITC logits, image to text.
        logits_per_text (`(batch_size, global_batch_size)`): ITC logits, text to image.
        mlm_logits (`(batch_size, text_length, vocab_size)`): MLM prediction scores.
        itm_logits (`(num_pairs, 2)`): ITM logits of positives then negatives.
        knowledge_gates (`(batch_size, K)`), retrieval_logits (`(batch_size, K)`), knowledge_indices (`(batch_size, K)`).
    """

    loss: torch.FloatTensor | None = None
    itc_loss: torch.FloatTensor | None = None
    knowledge_alignment_loss: torch.FloatTensor | None = None
    mlm_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    kg_loss: torch.FloatTensor | None = None
    retriever_loss: torch.FloatTensor | None = None
    relevance_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    mlm_logits: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    knowledge_gates: torch.FloatTensor | None = None
    retrieval_logits: torch.FloatTensor | None = None
    knowledge_indices: torch.LongTensor | None = None


# --------------------------------------------------------------------------------------------------------------------
# Leaf modules
# --------------------------------------------------------------------------------------------------------------------


class ReavlAttention(nn.Module):
    """Multi-head attention from `hidden_states` to `context_states` through SDPA, with an additive bias.

    The additive bias carries both padding (a large negative number) and the per-entry relevance gates
    (`log gate` on every token of an entry), which is how attention to an entry's tokens is weighted by its gate.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, context_size: int | None = None):
        super().__init__()
        context_size = hidden_size if context_size is None else context_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(context_size, hidden_size)
        self.v_proj = nn.Linear(context_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch_size, length, _ = states.shape
        return states.view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context_states: torch.Tensor,
        attention_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = self._split_heads(self.q_proj(hidden_states))
        key = self._split_heads(self.k_proj(context_states))
        value = self._split_heads(self.v_proj(context_states))
        if attention_bias is not None:
            attention_bias = attention_bias.to(query.dtype)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_bias, dropout_p=self.dropout if self.training else 0.0
        )
        batch_size, _, length, _ = attended.shape
        return self.out_proj(attended.transpose(1, 2).reshape(batch_size, length, -1))


class ReavlFeedForward(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(hidden_states))))


class ReavlFusionLayer(GradientCheckpointingLayer):
    """One knowledge-augmented fusion layer over the text tokens (pre-norm residual blocks):

    self-attention -> cross-attention to image patches -> gated cross-attention to the retrieved entries' tokens
    -> feed-forward. The knowledge branch is scaled by `tanh(knowledge_gate)`, a learned scalar initialised at
    `config.knowledge_gate_init`, so the model can learn to ignore knowledge entirely.
    """

    def __init__(self, config: ReavlConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        heads, dropout, eps = config.fusion_num_attention_heads, config.fusion_dropout, config.layer_norm_eps
        self.self_attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attention = ReavlAttention(hidden_size, heads, dropout)
        self.image_attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.image_attention = ReavlAttention(hidden_size, heads, dropout)
        self.knowledge_attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.knowledge_attention = ReavlAttention(hidden_size, heads, dropout)
        self.knowledge_gate = nn.Parameter(torch.zeros(1))
        self.feed_forward_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.feed_forward = ReavlFeedForward(hidden_size, config.fusion_intermediate_size, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        text_attention_bias: torch.Tensor,
        image_states: torch.Tensor,
        knowledge_states: torch.Tensor | None = None,
        knowledge_attention_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed = self.self_attention_norm(hidden_states)
        hidden_states = hidden_states + self.dropout(self.self_attention(normed, normed, text_attention_bias))
        normed = self.image_attention_norm(hidden_states)
        hidden_states = hidden_states + self.dropout(self.image_attention(normed, image_states))
        if knowledge_states is not None:
            normed = self.knowledge_attention_norm(hidden_states)
            knowledge_context = self.knowledge_attention(normed, knowledge_states, knowledge_attention_bias)
            hidden_states = hidden_states + torch.tanh(self.knowledge_gate) * self.dropout(knowledge_context)
        return hidden_states + self.feed_forward(self.feed_forward_norm(hidden_states))


class ReavlRelevanceGate(nn.Module):
    """Per-entry relevance gate: logit = <W_q query, W_e entry> / sqrt(d) + w_s * retrieval_score + b.

    The query is the unimodal image + text summary (the pair being read), the entry is the pooled knowledge state;
    the retrieval score lets the gate start from the retriever's opinion.
    """

    def __init__(self, config: ReavlConfig, vision_hidden_size: int, knowledge_hidden_size: int):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.query_projection = nn.Linear(hidden_size + vision_hidden_size, hidden_size)
        self.entry_projection = nn.Linear(knowledge_hidden_size, hidden_size)
        self.score_weight = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(1))
        self.scale = 1.0 / math.sqrt(hidden_size)

    def forward(
        self,
        text_pooled: torch.Tensor,
        image_pooled: torch.Tensor,
        knowledge_pooled: torch.Tensor,
        knowledge_scores: torch.Tensor,
    ) -> torch.Tensor:
        query = self.query_projection(torch.cat([text_pooled, image_pooled], dim=-1))  # (batch, hidden)
        entries = self.entry_projection(knowledge_pooled)  # (batch, K, hidden)
        similarity = torch.einsum("bh,bkh->bk", query, entries) * self.scale
        return similarity + self.score_weight * knowledge_scores + self.bias


class ReavlRetrievalHead(nn.Module):
    """Dense bi-encoder projections. Query = text projection + image projection of the unimodal pooled vectors;
    key = projection of the pooled knowledge vector. Both L2-normalised (inner product = cosine).

    The weights are plain parameters (not `nn.Linear` children) so that `_init_weights` sees and initialises them
    together: the query's text projection and the key projection start equal.
    """

    def __init__(self, config: ReavlConfig, vision_hidden_size: int, knowledge_hidden_size: int):
        super().__init__()
        text_hidden_size = config.text_config.hidden_size
        self.query_text_weight = nn.Parameter(torch.empty(config.retrieval_dim, text_hidden_size))
        self.query_image_weight = nn.Parameter(torch.empty(config.retrieval_dim, vision_hidden_size))
        self.key_weight = nn.Parameter(torch.empty(config.retrieval_dim, knowledge_hidden_size))

    def query(self, text_pooled: torch.Tensor | None, image_pooled: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if text_pooled is not None:
            parts.append(F.linear(text_pooled, self.query_text_weight))
        if image_pooled is not None:
            parts.append(F.linear(image_pooled, self.query_image_weight))
        return F.normalize(torch.stack(parts).sum(dim=0), dim=-1)

    def key(self, knowledge_pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.linear(knowledge_pooled, self.key_weight), dim=-1)


class ReavlMLMHead(nn.Module):
    def __init__(self, config: ReavlConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.transform = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, config.text_config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.transform(hidden_states))))


# --------------------------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------------------------


def _tower_hidden_size(tower_config) -> int:
    """Width of a tower's output states, across transformer (hidden_size), CNN (hidden_sizes) and timm configs."""
    for name in ("hidden_size", "num_features"):
        value = getattr(tower_config, name, None)
        if isinstance(value, int):
            return value
    hidden_sizes = getattr(tower_config, "hidden_sizes", None)
    if hidden_sizes:
        return hidden_sizes[-1]
    raise ValueError(
        f"cannot tell the output width of a {type(tower_config).__name__}: expected `hidden_size`, `num_features` "
        "or `hidden_sizes` in the tower config"
    )


class ReavlPreTrainedModel(PreTrainedModel):
    config_class = ReavlConfig
    base_model_prefix = "reavl"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["ReavlFusionLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, ReavlRetrievalHead):
            # Zero-shot retrieval must keep what a pretrained text tower knows: the query's text projection and the
            # key projection start as the same (semi-)orthogonal map, so query·key starts as the towers' cosine
            # similarity; the image part of the query starts small and is learnt in pre-training.
            init.orthogonal_(module.query_text_weight)
            if module.key_weight.shape == module.query_text_weight.shape:
                init.copy_(module.key_weight, module.query_text_weight)
            else:
                init.orthogonal_(module.key_weight)
            # Small, not zero: an image-only query must have a direction to normalise from the first step (a zero
            # vector would send a ~1e12 gradient through F.normalize), yet the image part stays negligible beside
            # the text part of a joint query, so zero-shot text retrieval is untouched.
            init.normal_(module.query_image_weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ReavlFusionLayer):
            init.constant_(module.knowledge_gate, self.config.knowledge_gate_init)
        elif isinstance(module, ReavlRelevanceGate):
            init.constant_(module.score_weight, self.config.relevance_score_weight_init)
            init.zeros_(module.bias)
        elif isinstance(module, ReavlModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            if module.knowledge_pool_scorer is not None:
                init.zeros_(module.knowledge_pool_scorer.weight)
                init.zeros_(module.knowledge_pool_scorer.bias)

        elif isinstance(module, nn.Linear):
            # Every tower is a PreTrainedModel with its own init; this branch only reaches REAVL's own layers.
            # 
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # DistMult multiplies three vectors: relations starting near 1 make the initial score the plain entity
            # similarity, instead of a near-zero product that barely moves.
            mean = 1.0 if module is getattr(self, "kg_relation_embeddings", None) else 0.0
            init.normal_(module.weight, mean=mean, std=std)


# --------------------------------------------------------------------------------------------------------------------
# Public models
# --------------------------------------------------------------------------------------------------------------------


def _validate_rank(name: str, tensor: torch.Tensor | None, rank: int, expected: str) -> None:
    if tensor is not None and tensor.dim() != rank:
        raise ValueError(f"{name} must have shape {expected}, got a tensor of shape {tuple(tensor.shape)}")


class ReavlModel(ReavlPreTrainedModel):
    """REAVL base model: towers, retriever projections, relevance gates and knowledge-augmented fusion.

    Example:

    ```python
    >>> model = ReavlModel(config)
    >>> outputs = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
    ...                 knowledge_input_ids=knowledge_ids, knowledge_attention_mask=knowledge_mask)
    >>> outputs.knowledge_gates.shape  # (batch, K)
    ```
    """

    def __init__(
        self,
        config: ReavlConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
        knowledge_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.text_model = text_model if text_model is not None else _text_encoder_from_config(config.text_config)
        if config.knowledge_config is not None:
            self.knowledge_model = (
                knowledge_model if knowledge_model is not None else _text_encoder_from_config(config.knowledge_config)
            )
        else:
            self.knowledge_model = None

        vision_hidden = _tower_hidden_size(config.vision_config)
        text_hidden = config.text_config.hidden_size
        knowledge_hidden = config.knowledge_encoder_config.hidden_size

        self.image_to_fusion = nn.Linear(vision_hidden, text_hidden)
        self.image_to_fusion_norm = nn.LayerNorm(text_hidden, eps=config.layer_norm_eps)
        self.knowledge_to_fusion = (
            nn.Linear(knowledge_hidden, text_hidden) if knowledge_hidden != text_hidden else nn.Identity()
        )
        self.image_projection = nn.Linear(vision_hidden, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text_hidden, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.retrieval_head = ReavlRetrievalHead(config, vision_hidden, knowledge_hidden)
        self.relevance_gate = ReavlRelevanceGate(config, vision_hidden, knowledge_hidden)
        # Learned attention pooling of knowledge entries (zero-initialised: starts as mean pooling).
        self.knowledge_pool_scorer = (
            nn.Linear(knowledge_hidden, 1) if config.knowledge_pooling == "attention" else None
        )
        self.fusion_layers = nn.ModuleList([ReavlFusionLayer(config) for _ in range(config.num_fusion_layers)])
        self.fusion_norm = nn.LayerNorm(text_hidden, eps=config.layer_norm_eps)
        self._retriever = None
        self.gradient_checkpointing = False
        self.post_init()

    def train(self, mode: bool = True):
        """As `nn.Module.train`, except that a tower whose parameters are all frozen stays in eval mode: its
        BatchNorm statistics and dropout must not move the queries and keys that a knowledge index was built with."""
        super().train(mode)
        if mode:
            for tower in (self.vision_model, self.text_model, self.knowledge_model):
                if tower is not None and not any(parameter.requires_grad for parameter in tower.parameters()):
                    tower.eval()
        return self

    # ----------------------------------------------------------------------------------------------------------------
    # retriever attachment (as RAG does): retrieval inside forward when no knowledge tensors are given
    # ----------------------------------------------------------------------------------------------------------------

    def set_retriever(self, retriever) -> None:
        """Attach a retriever (any object with `retrieve(query_embeddings, k)` returning the knowledge tensors, e.g.
        `processor.retriever`); `forward` then retrieves when it is given no knowledge tensors."""
        if retriever is not None and not callable(getattr(retriever, "retrieve", None)):
            raise ValueError(f"retriever must have a `retrieve(query_embeddings, k)` method, got {type(retriever)}")
        if retriever is not None and hasattr(retriever, "check_compatible"):
            retriever.check_compatible(self)
        self._retriever = retriever

    @property
    def retriever(self):
        return self._retriever

    # ----------------------------------------------------------------------------------------------------------------
    # unimodal encoders
    # ----------------------------------------------------------------------------------------------------------------

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        _validate_rank("pixel_values", pixel_values, 4, "(batch, channels, height, width)")
        vision_config = self.config.vision_config
        channels = getattr(vision_config, "num_channels", None)
        image_size = getattr(vision_config, "image_size", None)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        expected = (channels, *image_size) if channels and image_size else None
        if expected is not None and tuple(pixel_values.shape[1:]) != tuple(expected):
            raise ValueError(
                f"pixel_values must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) to match the "
                f"vision config, got {tuple(pixel_values.shape)}; resize images with the processor"
            )

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unimodal vision tower: (patch states `(batch, patches, vision_hidden)`, pooled `(batch, vision_hidden)`)."""
        self._check_pixel_values(pixel_values)
        outputs = self.vision_model(pixel_values=pixel_values)
        states = outputs.last_hidden_state
        if states.dim() == 4:  # CNN feature map (batch, channels, height, width) -> a sequence of positions
            states = states.flatten(2).transpose(1, 2)
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None or pooled.dim() != 2:
            pooled = states.mean(dim=1)
        return states, pooled

    def _pool(self, states: torch.Tensor, attention_mask: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        pooling = pooling or self.config.pooling
        if pooling == "cls":
            return states[:, 0]
        if pooling == "attention":
            scores = self.knowledge_pool_scorer(states).squeeze(-1).float()
            weights = scores.masked_fill(attention_mask == 0, torch.finfo(scores.dtype).min).softmax(dim=-1)
            return torch.einsum("bl,bld->bd", weights.to(states.dtype), states)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Unimodal text tower: (token states `(batch, length, text_hidden)`, pooled `(batch, text_hidden)`)."""
        _validate_rank("input_ids", input_ids, 2, "(batch, text_length)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return states, self._pool(states, attention_mask)

    def encode_knowledge(self, knowledge_input_ids: torch.Tensor, knowledge_attention_mask: torch.Tensor):
        """Knowledge encoder over flat entries `(num_entries, length)`: (token states, pooled vectors)."""
        encoder = self.knowledge_model if self.knowledge_model is not None else self.text_model
        states = encoder(input_ids=knowledge_input_ids, attention_mask=knowledge_attention_mask).last_hidden_state
        return states, self._pool(states, knowledge_attention_mask, self.config.knowledge_pooling)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC image embeddings `(batch, projection_dim)`."""
        _, pooled = self.encode_image(pixel_values)
        return F.normalize(self.image_projection(pooled), dim=-1)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised ITC text embeddings `(batch, projection_dim)`."""
        _, pooled = self.encode_text(input_ids, attention_mask)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def get_knowledge_features(
        self, knowledge_input_ids: torch.Tensor, knowledge_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Retrieval keys `(num_entries, retrieval_dim)` (L2-normalised) of flat entries `(num_entries, length)`:
        what the knowledge index stores."""
        _validate_rank("knowledge_input_ids", knowledge_input_ids, 2, "(num_entries, knowledge_length)")
        if knowledge_attention_mask is None:
            knowledge_attention_mask = torch.ones_like(knowledge_input_ids)
        _, pooled = self.encode_knowledge(knowledge_input_ids, knowledge_attention_mask)
        return self.retrieval_head.key(pooled)

    def knowledge_encoder_parameters(self):
        """(name, parameter) pairs that determine the retrieval keys: the knowledge encoder and the key projection."""
        encoder = self.knowledge_model if self.knowledge_model is not None else self.text_model
        yield from encoder.named_parameters()
        yield "retrieval_head.key_weight", self.retrieval_head.key_weight
        if self.knowledge_pool_scorer is not None:
            yield from self.knowledge_pool_scorer.named_parameters(prefix="knowledge_pool_scorer")

    @torch.no_grad()
    def knowledge_encoder_fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the weights that produce the retrieval keys, as float32 bytes.

        A knowledge index stores the fingerprint of the encoder that embedded it; a retriever refuses to serve a
        model whose fingerprint differs, because its keys would live in another space than the queries.
        """
        import hashlib

        digest = hashlib.sha256()
        for name, parameter in sorted(self.knowledge_encoder_parameters(), key=lambda item: item[0]):
            digest.update(name.encode())
            digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def get_query_embeddings(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Retrieval queries `(batch, retrieval_dim)` from the unimodal towers; either modality may be absent."""
        if pixel_values is None and input_ids is None:
            raise ValueError("get_query_embeddings needs pixel_values, input_ids or both")
        image_pooled = self.encode_image(pixel_values)[1] if pixel_values is not None else None
        text_pooled = self.encode_text(input_ids, attention_mask)[1] if input_ids is not None else None
        return self.retrieval_query(text_pooled, image_pooled)

    def retrieval_query(self, text_pooled: torch.Tensor | None, image_pooled: torch.Tensor | None) -> torch.Tensor:
        """The retrieval query from the modalities `config.retrieval_query_modalities` names (when both are given;
        a single given modality is used as it is)."""
        modalities = self.config.retrieval_query_modalities
        if text_pooled is not None and image_pooled is not None and modalities != "image_text":
            text_pooled, image_pooled = (None, image_pooled) if modalities == "image" else (text_pooled, None)
        return self.retrieval_head.query(text_pooled, image_pooled)

    # ----------------------------------------------------------------------------------------------------------------
    # knowledge path
    # ----------------------------------------------------------------------------------------------------------------

    def _validate_knowledge(self, batch_size, knowledge_input_ids, knowledge_attention_mask, knowledge_scores):
        if knowledge_input_ids is None:
            if knowledge_attention_mask is not None or knowledge_scores is not None:
                raise ValueError("knowledge_attention_mask / knowledge_scores were given without knowledge_input_ids")
            return
        _validate_rank("knowledge_input_ids", knowledge_input_ids, 3, "(batch, num_knowledge, knowledge_length)")
        if knowledge_attention_mask is None:
            raise ValueError(
                "knowledge_input_ids was given without knowledge_attention_mask; pass the mask of shape "
                f"{tuple(knowledge_input_ids.shape)} (the retriever returns both)"
            )
        if knowledge_attention_mask.shape != knowledge_input_ids.shape:
            raise ValueError(
                f"knowledge_attention_mask must have the shape of knowledge_input_ids "
                f"{tuple(knowledge_input_ids.shape)}, got {tuple(knowledge_attention_mask.shape)}"
            )
        if knowledge_input_ids.shape[0] != batch_size:
            raise ValueError(
                f"knowledge_input_ids has batch size {knowledge_input_ids.shape[0]} but the text batch is {batch_size}"
            )
        if knowledge_scores is not None and tuple(knowledge_scores.shape) != tuple(knowledge_input_ids.shape[:2]):
            raise ValueError(
                f"knowledge_scores must have shape (batch, num_knowledge) = {tuple(knowledge_input_ids.shape[:2])}, "
                f"got {tuple(knowledge_scores.shape)}"
            )

    def _retrieve(self, query_embeds: torch.Tensor, num_knowledge: int) -> dict[str, torch.Tensor]:
        result = self._retriever.retrieve(query_embeds.detach().float(), num_knowledge)
        device = query_embeds.device
        return {
            name: torch.as_tensor(result[name]).to(device)
            for name in ("knowledge_input_ids", "knowledge_attention_mask", "knowledge_scores", "knowledge_indices")
        }

    def knowledge_bias(self, gates: torch.Tensor, knowledge_attention_mask: torch.Tensor, dtype) -> torch.Tensor:
        """Additive attention bias `(batch, 1, 1, K * length)`: log gate of the entry on its tokens, -inf on padding."""
        batch_size, num_entries, length = knowledge_attention_mask.shape
        log_gates = torch.log(gates.clamp(min=1e-6)).unsqueeze(-1).expand(batch_size, num_entries, length)
        bias = log_gates.masked_fill(knowledge_attention_mask == 0, torch.finfo(dtype).min)
        return bias.reshape(batch_size, 1, 1, num_entries * length).to(dtype)

    def fuse(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_states: torch.Tensor,
        knowledge_states: torch.Tensor | None = None,
        knowledge_attention_mask: torch.Tensor | None = None,
        knowledge_gates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Knowledge-augmented fusion of unimodal states. Shapes: text `(B, T, D)`, image `(B, N, Dv)`, knowledge
        token states `(B, K, L, D)` with mask `(B, K, L)` and gates `(B, K)`; returns fused states `(B, T, D)`."""
        dtype = text_states.dtype
        text_bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        image_context = self.image_to_fusion_norm(self.image_to_fusion(image_states))
        flat_knowledge, knowledge_bias = None, None
        if knowledge_states is not None and knowledge_states.shape[1] > 0:
            batch_size, num_entries, length, hidden = knowledge_states.shape
            flat_knowledge = self.knowledge_to_fusion(knowledge_states.reshape(batch_size, num_entries * length, hidden))
            knowledge_bias = self.knowledge_bias(knowledge_gates, knowledge_attention_mask, dtype)
        hidden_states = text_states
        for layer in self.fusion_layers:
            hidden_states = layer(hidden_states, text_bias, image_context, flat_knowledge, knowledge_bias)
        return self.fusion_norm(hidden_states)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        knowledge_input_ids: torch.Tensor | None = None,
        knowledge_attention_mask: torch.Tensor | None = None,
        knowledge_scores: torch.Tensor | None = None,
        knowledge_indices: torch.Tensor | None = None,
        use_knowledge: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ReavlModelOutput:
        r"""
        Args:
            pixel_values (`(batch, channels, height, width)`): images, as the processor prepares them.
            input_ids, attention_mask (`(batch, text_length)`): the text.
            knowledge_input_ids, knowledge_attention_mask (`(batch, K, knowledge_length)`, *optional*): pre-tokenized
                knowledge entries (what the retriever returns). Without them and with a retriever attached (see
                `set_retriever`), the model retrieves `config.num_knowledge` entries itself.
            knowledge_scores (`(batch, K)`, *optional*): retrieval scores of the entries (feed the relevance gates;
                when absent the gates use the scores under the current weights).
            knowledge_indices (`(batch, K)`, *optional*): index rows of the entries, passed through to the output.
            use_knowledge (`bool`, defaults to `True`): `False` runs the no-knowledge path whatever is given.
        """
        parts = self.run_parts(
            pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask,
            knowledge_scores, knowledge_indices, use_knowledge,
        )
        knowledge = parts["knowledge"]
        return ReavlModelOutput(
            last_hidden_state=parts["fused"],
            pooler_output=parts["fused"][:, 0],
            image_embeds=parts["image_embeds"],
            text_embeds=parts["text_embeds"],
            query_embeds=parts["query_embeds"],
            knowledge_embeds=knowledge["keys"],
            retrieval_logits=knowledge["retrieval_logits"],
            knowledge_scores=knowledge["scores"],
            knowledge_gate_logits=knowledge["gate_logits"],
            knowledge_gates=knowledge["gates"],
            knowledge_indices=parts["knowledge_indices"],
            image_hidden_states=parts["image_states"],
            text_hidden_states=parts["text_states"],
        )

    def run_parts(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        knowledge_input_ids: torch.Tensor | None = None,
        knowledge_attention_mask: torch.Tensor | None = None,
        knowledge_scores: torch.Tensor | None = None,
        knowledge_indices: torch.Tensor | None = None,
        use_knowledge: bool = True,
    ) -> dict[str, Any]:
        """The whole forward pass, returning every intermediate the task heads reuse (unimodal states and pooled
        vectors, the encoded knowledge, the fused states) so that no head encodes anything twice."""
        if pixel_values is None or input_ids is None:
            raise ValueError("ReavlModel.forward needs both pixel_values and input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values.dim() == 4 and input_ids.dim() == 2 and pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"pixel_values has batch size {pixel_values.shape[0]} but input_ids has batch size "
                f"{input_ids.shape[0]}; every text needs its image"
            )
        self._validate_knowledge(input_ids.shape[0], knowledge_input_ids, knowledge_attention_mask, knowledge_scores)

        image_states, image_pooled = self.encode_image(pixel_values)
        text_states, text_pooled = self.encode_text(input_ids, attention_mask)
        query_embeds = self.retrieval_query(text_pooled, image_pooled)

        use_knowledge = use_knowledge and self.config.num_knowledge > 0
        if use_knowledge and knowledge_input_ids is None and self._retriever is not None:
            retrieved = self._retrieve(query_embeds, self.config.num_knowledge)
            knowledge_input_ids = retrieved["knowledge_input_ids"]
            knowledge_attention_mask = retrieved["knowledge_attention_mask"]
            knowledge_scores = retrieved["knowledge_scores"].to(query_embeds.dtype)
            knowledge_indices = retrieved["knowledge_indices"]
        if not use_knowledge or knowledge_input_ids is None:
            knowledge_input_ids = knowledge_attention_mask = knowledge_scores = knowledge_indices = None

        knowledge = self.encode_retrieved_knowledge(
            query_embeds, text_pooled, image_pooled, knowledge_input_ids, knowledge_attention_mask, knowledge_scores
        )
        fused = self.fuse(
            text_states, attention_mask, image_states, knowledge["states"], knowledge_attention_mask, knowledge["gates"]
        )
        return {
            "attention_mask": attention_mask,
            "image_states": image_states,
            "image_pooled": image_pooled,
            "text_states": text_states,
            "text_pooled": text_pooled,
            "image_embeds": F.normalize(self.image_projection(image_pooled), dim=-1),
            "text_embeds": F.normalize(self.text_projection(text_pooled), dim=-1),
            "query_embeds": query_embeds,
            "knowledge": knowledge,
            "knowledge_input_ids": knowledge_input_ids,
            "knowledge_attention_mask": knowledge_attention_mask,
            "knowledge_indices": knowledge_indices,
            "fused": fused,
        }

    def encode_retrieved_knowledge(
        self, query_embeds, text_pooled, image_pooled, knowledge_input_ids, knowledge_attention_mask, knowledge_scores
    ) -> dict[str, torch.Tensor | None]:
        """Encode `(B, K, L)` entries and compute their keys, retrieval logits and relevance gates.

        Returns a dict with `states` `(B, K, L, D)`, `pooled` `(B, K, Dk)`, `keys` `(B, K, R)`, `retrieval_logits`,
        `scores`, `gate_logits`, `gates` (all `(B, K)`); with no knowledge the tensors are `(B, 0)` and `states` is None.
        """
        batch_size = query_embeds.shape[0]
        if knowledge_input_ids is None or knowledge_input_ids.shape[1] == 0:
            empty = query_embeds.new_zeros(batch_size, 0)
            return {
                "states": None,
                "pooled": None,
                "keys": query_embeds.new_zeros(batch_size, 0, query_embeds.shape[-1]),
                "retrieval_logits": empty,
                "scores": empty,
                "gate_logits": empty,
                "gates": empty,
            }
        _, num_entries, length = knowledge_input_ids.shape
        states, pooled = self.encode_knowledge(
            knowledge_input_ids.reshape(batch_size * num_entries, length),
            knowledge_attention_mask.reshape(batch_size * num_entries, length),
        )
        states = states.reshape(batch_size, num_entries, length, -1)
        pooled = pooled.reshape(batch_size, num_entries, -1)
        keys = self.retrieval_head.key(pooled)
        retrieval_logits = torch.einsum("br,bkr->bk", query_embeds, keys)
        scores = knowledge_scores.to(retrieval_logits.dtype) if knowledge_scores is not None else retrieval_logits
        gate_logits = self.relevance_gate(text_pooled, image_pooled, pooled, scores)
        return {
            "states": states,
            "pooled": pooled,
            "keys": keys,
            "retrieval_logits": retrieval_logits,
            "scores": scores,
            "gate_logits": gate_logits,
            "gates": torch.sigmoid(gate_logits),
        }

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_path: str | None = None, text_path: str | None = None, vision_model=None, text_model=None,
        **config_kwargs,
    ):
        """Build a REAVL model around pretrained towers loaded from local folders (or given as models).

        REAVL's own layers (fusion, gates, projections, heads) are freshly initialised; the towers keep their
        weights. `config_kwargs` go to [`ReavlConfig`].

        ```python
        >>> model = ReavlModel.from_vision_text_pretrained("path/to/vit", "path/to/minilm", num_knowledge=4)
        ```
        """
        if vision_model is None:
            if vision_path is None:
                raise ValueError("from_vision_text_pretrained needs vision_path or vision_model")
            vision_model = AutoModel.from_pretrained(vision_path)
        if text_model is None:
            if text_path is None:
                raise ValueError("from_vision_text_pretrained needs text_path or text_model")
            text_model = _text_encoder_from_pretrained(text_path)
        text_hidden = text_model.config.hidden_size
        config_kwargs.setdefault("fusion_num_attention_heads", text_model.config.num_attention_heads)
        config_kwargs.setdefault("fusion_intermediate_size", text_model.config.intermediate_size)
        config_kwargs.setdefault("retrieval_dim", min(256, text_hidden))
        config = ReavlConfig(
            vision_config=vision_model.config.to_dict(), text_config=text_model.config.to_dict(), **config_kwargs
        )
        return cls(config, vision_model=vision_model, text_model=text_model)


def _text_encoder_from_config(text_config):
    """A text tower without its pooler head (REAVL pools itself; an unused pooler would break DDP)."""
    try:
        return AutoModel.from_config(text_config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(text_config)


def _text_encoder_from_pretrained(path):
    try:
        return AutoModel.from_pretrained(path, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_pretrained(path)


class ReavlForPreTraining(ReavlPreTrainedModel):
    """REAVL with the heads and losses of the four knowledge-aware pre-training tasks and retriever learning.

    Each loss is computed when its targets are given:

    - ITC (always, batch > 1) and knowledge alignment (`knowledge_labels`: `(B, K)` 1 for weak-positive entries);
    - knowledge-augmented MLM (`mlm_input_ids`, `mlm_labels`: `(B, T)`, -100 where not masked);
    - ITM with hard negatives mined from the ITC similarities (`compute_itm=True`, batch > 1);
    - KG relational reasoning (`kg_triples`: `(B, num_triples, 3)` rows `[head slot in 0..K-1, relation id,
      tail slot in 0..B*K-1 over the flattened batch of entries]`, padded with -1);
    - retriever learning: KL from the relevance gates' posterior to the retriever's softmax over the entries, and the
      relevance loss (gate logits against `knowledge_labels`).
    """

    def __init__(self, config: ReavlConfig):
        super().__init__(config)
        self.reavl = ReavlModel(config)
        hidden = config.text_config.hidden_size
        knowledge_hidden = config.knowledge_encoder_config.hidden_size
        self.mlm_head = ReavlMLMHead(config)
        self.itm_head = nn.Linear(hidden, 2)
        self.kg_entity_projection = nn.Linear(knowledge_hidden, hidden)
        self.kg_head_projection = nn.Linear(2 * hidden, hidden)
        self.kg_relation_embeddings = nn.Embedding(config.num_kg_relations, hidden)
        self.post_init()

    def set_retriever(self, retriever) -> None:
        self.reavl.set_retriever(retriever)

    def _itc_losses(
        self,
        parts: dict[str, Any],
        knowledge_labels: torch.Tensor | None,
        masked_text_pooled: torch.Tensor | None,
        negative_keys: torch.Tensor | None = None,
        negative_key_indices: torch.Tensor | None = None,
        view_image_pooled: torch.Tensor | None = None,
    ):
        rank, _ = _distributed_world()
        image_embeds, text_embeds = parts["image_embeds"], parts["text_embeds"]
        batch_size = image_embeds.shape[0]
        all_image = gather_with_grad(image_embeds)
        all_text = gather_with_grad(text_embeds)
        scale = self.reavl.logit_scale.exp().clamp(max=100.0)
        logits_per_image = scale * image_embeds @ all_text.t()
        logits_per_text = scale * text_embeds @ all_image.t()
        targets = torch.arange(batch_size, device=all_image.device) + rank * batch_size
        itc_loss = None
        if all_image.shape[0] > 1:
            itc_loss = (contrastive_loss(logits_per_image, targets) + contrastive_loss(logits_per_text, targets)) / 2
        alignment_loss = None
        keys = parts["knowledge"]["keys"]
        if knowledge_labels is not None and keys.shape[1] > 0:
            # Every entry retrieved anywhere in the global batch is a candidate; a pair's weak positives are its own.
            num_entries = keys.shape[1]
            all_keys = gather_with_grad(keys.reshape(batch_size * num_entries, -1))
            positive = torch.zeros(batch_size, all_keys.shape[0], dtype=torch.bool, device=all_keys.device)
            own_slots = rank * batch_size * num_entries + torch.arange(batch_size * num_entries, device=all_keys.device)
            positive[
                torch.arange(batch_size, device=all_keys.device).repeat_interleave(num_entries), own_slots
            ] = knowledge_labels.reshape(-1) > 0
            # Align the pair's query, the image-only query and (with MLM) the query of the image with the
            # entity-masked caption: knowledge questions rarely name the entity, so retrieval must work when the text
            # carries no identity, from the image and whatever else the text says.
            head = self.reavl.retrieval_head
            text_bearing = [parts["query_embeds"]]
            if masked_text_pooled is not None:
                text_bearing.append(head.query(masked_text_pooled, parts["image_pooled"]))
            candidates = all_keys
            if negative_keys is not None and negative_keys.shape[0] > 0:
                # Index-wide negatives (cached index embeddings, no gradient): every entry of the index competes, not
                # only the few retrieved in this batch, which is what image-only retrieval needs to separate
                # hundreds of look-alike entities. Rows retrieved in the batch already compete with fresh keys.
                extra = negative_keys.to(all_keys.dtype).detach()
                if negative_key_indices is not None and parts["knowledge_indices"] is not None:
                    in_batch = (negative_key_indices[:, None] == parts["knowledge_indices"].reshape(1, -1)).any(-1)
                    extra = extra[~in_batch]
                candidates = torch.cat([all_keys, extra])
                positive = torch.cat([positive, positive.new_zeros(batch_size, extra.shape[0])], dim=1)
            # Extra augmented views of each image (vision tower only): their image-only queries share the pair's
            # positives, several looks at an entity per pair for the price of a few small CNN/ViT passes.
            image_only = [(head.query(None, parts["image_pooled"]), positive)]
            if view_image_pooled is not None:
                num_views = view_image_pooled.shape[0] // batch_size
                image_only.append((head.query(None, view_image_pooled), positive.repeat_interleave(num_views, 0)))
            temperature = self.config.retrieval_temperature
            losses = [
                multi_positive_contrastive_loss(query @ candidates.t() / temperature, positive) for query in text_bearing
            ]
            # Image-only queries learn to find the keys but do not move them: keys are anchored by the text-bearing
            # queries (which name or describe the entity). Early image queries are nearly alike, and letting them
            # pull the keys would drag every key towards the same point.
            losses += [
                multi_positive_contrastive_loss(query @ candidates.detach().t() / temperature, targets)
                for query, targets in image_only
            ]
            alignment_loss = torch.stack(losses).mean()
        return itc_loss, alignment_loss, logits_per_image, logits_per_text

    def _itm_loss(self, parts: dict[str, Any]):
        """Fusion over the positive pairs and hard negatives sampled from the ITC similarities (as BLIP/ALBEF do)."""
        model, knowledge = self.reavl, parts["knowledge"]
        batch_size = parts["image_embeds"].shape[0]
        device = parts["image_embeds"].device
        repeat = min(self.config.num_itm_hard_negatives, batch_size - 1)
        # ITM costs (1 + 2 * repeat) fusion passes per anchor: `itm_max_examples` caps the anchors (the first ones of
        # the batch; negatives are still mined from the whole batch).
        num_anchors = min(batch_size, self.config.itm_max_examples or batch_size)
        with torch.no_grad():
            similarity = (parts["image_embeds"] @ parts["text_embeds"].t()).float()
            eye = torch.eye(batch_size, dtype=torch.bool, device=device)
            # +1e-8 keeps every other example drawable; the diagonal (the positive) is never drawn.
            weights_i2t = ((similarity / 0.07).softmax(dim=1) + 1e-8).masked_fill(eye, 0)
            weights_t2i = ((similarity.t() / 0.07).softmax(dim=1) + 1e-8).masked_fill(eye, 0)
            negative_text = torch.multinomial(weights_i2t[:num_anchors], repeat).flatten()
            negative_image = torch.multinomial(weights_t2i[:num_anchors], repeat).flatten()
        anchors = torch.arange(num_anchors, device=device).repeat_interleave(repeat)
        positives = torch.arange(num_anchors, device=device)
        # Pairs (image, text): positives, then (image, hard negative text), then (hard negative image, text).
        # The knowledge follows the image: it is what was retrieved for, and linked to, that image.
        image_index = torch.cat([positives, anchors, negative_image])
        text_index = torch.cat([positives, negative_text, anchors])
        labels = torch.cat([torch.ones(num_anchors), torch.zeros(2 * num_anchors * repeat)]).long().to(device)
        knowledge_states, knowledge_mask, gates = None, None, None
        if knowledge["states"] is not None:
            knowledge_states = knowledge["states"][image_index]
            knowledge_mask = parts["knowledge_attention_mask"][image_index]
            gates = torch.sigmoid(
                model.relevance_gate(
                    parts["text_pooled"][text_index],
                    parts["image_pooled"][image_index],
                    knowledge["pooled"][image_index],
                    knowledge["scores"][image_index],
                )
            )
        fused = model.fuse(
            parts["text_states"][text_index],
            parts["attention_mask"][text_index],
            parts["image_states"][image_index],
            knowledge_states,
            knowledge_mask,
            gates,
        )
        itm_logits = self.itm_head(fused[:, 0])
        return F.cross_entropy(itm_logits, labels), itm_logits

    def _kg_loss(self, fused_pooled: torch.Tensor, knowledge_pooled: torch.Tensor, kg_triples: torch.Tensor):
        batch_size, num_entries, _ = knowledge_pooled.shape
        valid = (kg_triples >= 0).all(dim=-1)
        if not valid.any():
            return None
        if kg_triples[..., 1].max() >= self.config.num_kg_relations:
            raise ValueError(
                f"kg_triples holds relation id {int(kg_triples[..., 1].max())} but num_kg_relations="
                f"{self.config.num_kg_relations}"
            )
        entities = self.kg_entity_projection(knowledge_pooled)  # (B, K, D)
        example_index = torch.arange(batch_size, device=kg_triples.device)[:, None].expand_as(valid)[valid]
        head_slot, relation, tail = kg_triples[valid].unbind(-1)
        # The head is read in the context of the pair (fused [CLS]), so the relation is reasoned about, not recalled.
        heads = self.kg_head_projection(torch.cat([entities[example_index, head_slot], fused_pooled[example_index]], -1))
        relations = self.kg_relation_embeddings(relation)
        candidates = entities.reshape(batch_size * num_entries, -1)
        scores = (heads * relations) @ candidates.t() / math.sqrt(heads.shape[-1])  # DistMult over the batch's entries
        return F.cross_entropy(scores, tail)

    def _retriever_losses(self, parts: dict[str, Any], knowledge_labels: torch.Tensor | None):
        knowledge = parts["knowledge"]
        valid_entries = parts["knowledge_attention_mask"].any(dim=-1)
        # Atlas-style distillation: the retriever's distribution over the K entries is pulled towards the fusion
        # model's own judgement of which entries are informative (the gate posterior, detached).
        retriever_log_probs = (
            (knowledge["retrieval_logits"] / self.config.retrieval_temperature)
            .masked_fill(~valid_entries, torch.finfo(knowledge["retrieval_logits"].dtype).min)
            .log_softmax(dim=-1)
        )
        target = (
            knowledge["gate_logits"].detach()
            .masked_fill(~valid_entries, torch.finfo(knowledge["gate_logits"].dtype).min)
            .softmax(dim=-1)
        )
        retriever_loss = (target * (torch.log(target.clamp(min=1e-12)) - retriever_log_probs)).sum(-1).mean()
        relevance_loss = None
        if knowledge_labels is not None:
            relevance_loss = F.binary_cross_entropy_with_logits(
                knowledge["gate_logits"][valid_entries],
                knowledge_labels.to(knowledge["gate_logits"].dtype)[valid_entries],
            )
        return retriever_loss, relevance_loss

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        knowledge_input_ids: torch.Tensor | None = None,
        knowledge_attention_mask: torch.Tensor | None = None,
        knowledge_scores: torch.Tensor | None = None,
        knowledge_indices: torch.Tensor | None = None,
        knowledge_labels: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        kg_triples: torch.Tensor | None = None,
        negative_keys: torch.Tensor | None = None,
        negative_key_indices: torch.Tensor | None = None,
        view_pixel_values: torch.Tensor | None = None,
        compute_itm: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ReavlForPreTrainingOutput:
        r"""
        Args:
            pixel_values, input_ids, attention_mask, knowledge_*: as in [`ReavlModel.forward`].
            knowledge_labels (`(batch, K)`, *optional*): 1 for the entries that are weak positives of the pair.
            mlm_input_ids (`(batch, text_length)`, *optional*): the masked text; `mlm_labels` the targets (-100 off).
            kg_triples (`(batch, num_triples, 3)`, *optional*): `[head slot, relation id, tail slot]`, -1 padded.
            negative_keys (`(num_negatives, retrieval_dim)`, *optional*): cached index embeddings used as extra
                negatives of the knowledge alignment (no gradient); `negative_key_indices` `(num_negatives,)` their
                index rows, so that rows retrieved in the batch are not counted twice.
            view_pixel_values (`(batch, views, channels, height, width)`, *optional*): extra augmented views of each
                image; their image-only queries are aligned to the pair's weak positives.
            compute_itm (`bool`, defaults to `True`): compute the ITM loss (needs batch > 1).
        """
        parts = self.reavl.run_parts(
            pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask,
            knowledge_scores, knowledge_indices,
        )
        knowledge = parts["knowledge"]
        has_knowledge = knowledge["states"] is not None
        if knowledge_labels is not None and has_knowledge and knowledge_labels.shape != knowledge["gates"].shape:
            raise ValueError(
                f"knowledge_labels must have shape (batch, num_knowledge) = {tuple(knowledge['gates'].shape)}, "
                f"got {tuple(knowledge_labels.shape)}"
            )
        losses: dict[str, torch.Tensor | None] = dict.fromkeys(
            ["itc_loss", "knowledge_alignment_loss", "mlm_loss", "itm_loss", "kg_loss", "retriever_loss",
             "relevance_loss"]
        )
        masked_states, masked_pooled = None, None
        if mlm_labels is not None:
            if mlm_input_ids is None or mlm_input_ids.shape != mlm_labels.shape:
                raise ValueError(
                    "mlm_labels need mlm_input_ids (the masked text) of the same shape "
                    f"{tuple(mlm_labels.shape)}, got {None if mlm_input_ids is None else tuple(mlm_input_ids.shape)}"
                )
            masked_states, masked_pooled = self.reavl.encode_text(mlm_input_ids, parts["attention_mask"])
        view_image_pooled = None
        if view_pixel_values is not None:
            if view_pixel_values.dim() != 5 or view_pixel_values.shape[0] != pixel_values.shape[0]:
                raise ValueError(
                    "view_pixel_values must have shape (batch, views, channels, height, width) with batch "
                    f"{pixel_values.shape[0]}, got {tuple(view_pixel_values.shape)}"
                )
            _, view_image_pooled = self.reavl.encode_image(view_pixel_values.flatten(0, 1))
        if negative_keys is not None and (
            negative_keys.dim() != 2 or negative_keys.shape[-1] != parts["query_embeds"].shape[-1]
        ):
            raise ValueError(
                f"negative_keys must have shape (num_negatives, retrieval_dim={parts['query_embeds'].shape[-1]}), "
                f"got {tuple(negative_keys.shape)}"
            )
        losses["itc_loss"], losses["knowledge_alignment_loss"], logits_per_image, logits_per_text = self._itc_losses(
            parts, knowledge_labels if has_knowledge else None, masked_pooled, negative_keys, negative_key_indices,
            view_image_pooled,
        )

        mlm_logits = None
        if mlm_labels is not None:
            fused_masked = self.reavl.fuse(
                masked_states, parts["attention_mask"], parts["image_states"], knowledge["states"],
                parts["knowledge_attention_mask"], knowledge["gates"],
            )
            mlm_logits = self.mlm_head(fused_masked)
            losses["mlm_loss"] = F.cross_entropy(
                mlm_logits.reshape(-1, mlm_logits.shape[-1]), mlm_labels.reshape(-1), ignore_index=-100
            )

        itm_logits = None
        if compute_itm and parts["image_embeds"].shape[0] > 1:
            losses["itm_loss"], itm_logits = self._itm_loss(parts)

        if has_knowledge:
            if kg_triples is not None:
                losses["kg_loss"] = self._kg_loss(parts["fused"][:, 0], knowledge["pooled"], kg_triples)
            losses["retriever_loss"], losses["relevance_loss"] = self._retriever_losses(parts, knowledge_labels)

        weights = {
            "itc_loss": self.config.itc_loss_weight,
            "knowledge_alignment_loss": self.config.knowledge_alignment_loss_weight,
            "mlm_loss": self.config.mlm_loss_weight,
            "itm_loss": self.config.itm_loss_weight,
            "kg_loss": self.config.kg_loss_weight,
            "retriever_loss": self.config.retriever_loss_weight,
            "relevance_loss": self.config.relevance_loss_weight,
        }
        weighted = [weights[name] * value for name, value in losses.items() if value is not None]
        return ReavlForPreTrainingOutput(
            loss=torch.stack(weighted).sum() if weighted else None,
            **losses,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            mlm_logits=mlm_logits,
            itm_logits=itm_logits,
            knowledge_gates=knowledge["gates"],
            retrieval_logits=knowledge["retrieval_logits"],
            knowledge_indices=parts["knowledge_indices"],
        )


# --------------------------------------------------------------------------------------------------------------------
# Downstream heads
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ReavlTaskOutput(ModelOutput):
    r"""
    Output of the REAVL task heads. `K` entries of knowledge per example (the candidates, for entity linking).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): task loss, when labels were given.
        logits (`torch.FloatTensor`): task scores: `(batch, num_labels)` for answers and classes, `(batch, K)`
            over the candidates for entity linking.
        knowledge_indices (`torch.LongTensor` of shape `(batch, K)`, *optional*): index rows of the entries used.
        knowledge_scores (`torch.FloatTensor` of shape `(batch, K)`): their retrieval scores.
        knowledge_gates (`torch.FloatTensor` of shape `(batch, K)`): how much each entry was let into the fusion.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    knowledge_indices: torch.LongTensor | None = None
    knowledge_scores: torch.FloatTensor | None = None
    knowledge_gates: torch.FloatTensor | None = None


@dataclass
class ReavlImageTextRetrievalOutput(ModelOutput):
    r"""
    Output of [`ReavlForImageTextRetrieval`] (CLIP-style, so the zero-shot-image-classification pipeline reads it).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): symmetric ITC loss when `return_loss=True`.
        logits_per_image (`torch.FloatTensor` of shape `(num_images, num_texts)`): scaled image-text similarities.
        logits_per_text (`torch.FloatTensor` of shape `(num_texts, num_images)`): the transpose.
        image_embeds (`(num_images, projection_dim)`), text_embeds (`(num_texts, projection_dim)`): L2-normalised.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


class ReavlClassifierHead(nn.Module):
    """Two-layer classifier over the fused [CLS] state (as VQA heads of ViLT/BLIP do)."""

    def __init__(self, config: ReavlConfig, input_size: int, num_labels: int):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.dense = nn.Linear(input_size, 2 * hidden)
        self.norm = nn.LayerNorm(2 * hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.fusion_dropout)
        self.out_proj = nn.Linear(2 * hidden, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.norm(F.gelu(self.dense(pooled)))))


class _ReavlTaskModel(ReavlPreTrainedModel):
    """Shared plumbing of the task heads: the base model at `.reavl`, retriever attachment, knowledge kwargs."""

    def set_retriever(self, retriever) -> None:
        """Attach a retriever to the base model (see [`ReavlModel.set_retriever`])."""
        self.reavl.set_retriever(retriever)

    @property
    def retriever(self):
        return self.reavl.retriever

    def _task_output(self, loss, logits, parts) -> ReavlTaskOutput:
        knowledge = parts["knowledge"]
        return ReavlTaskOutput(
            loss=loss,
            logits=logits,
            knowledge_indices=parts["knowledge_indices"],
            knowledge_scores=knowledge["scores"],
            knowledge_gates=knowledge["gates"],
        )


class ReavlForQuestionAnswering(_ReavlTaskModel):
    """Knowledge-based VQA as classification over an answer vocabulary (`config.id2label`), trained with soft VQA
    targets (binary cross-entropy on the annotators' scores).

    ```python
    >>> outputs = model(**processor(images=image, text="What language is spoken here?", return_tensors="pt"))
    >>> model.config.id2label[outputs.logits.argmax(-1).item()]
    ```
    """

    def __init__(self, config: ReavlConfig):
        super().__init__(config)
        self.reavl = ReavlModel(config)
        hidden = config.text_config.hidden_size
        self.vqa_head = ReavlClassifierHead(config, hidden, config.num_labels)
        # Copy from knowledge: a pointer from the fused [CLS] over the retrieved entries' tokens. Answers that a
        # knowledge base states (a capital, a language) are read from the entry instead of recalled by the
        # classifier, which is what lets the model answer for entities it was never fine-tuned on.
        self.copy_query = nn.Linear(hidden, hidden)
        self.copy_key = nn.Linear(config.knowledge_encoder_config.hidden_size, hidden)
        self.copy_weight = nn.Parameter(torch.full((1,), float(config.answer_copy_weight_init)))
        answers = config.answer_token_ids
        if answers is not None and len(answers) != config.num_labels:
            raise ValueError(
                f"answer_token_ids has {len(answers)} answers but the model has num_labels={config.num_labels}"
            )
        self._answer_table: torch.Tensor | None = None
        self.post_init()

    @property
    def answer_token_ids(self) -> torch.Tensor:
        """`(num_labels, max_answer_tokens)` token ids of each answer label, -1 padded (empty without copying).

        Built from the config on first use, not kept as a buffer: non-persistent buffers are not materialised when
        `from_pretrained` builds the model on the meta device."""
        if self._answer_table is None:
            answers = self.config.answer_token_ids or []
            width = max((len(tokens) for tokens in answers), default=1)
            table = torch.full((len(answers), width), -1, dtype=torch.long, device="cpu")
            for row, tokens in enumerate(answers):
                table[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long, device="cpu")
            self._answer_table = table
        return self._answer_table

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            init.constant_(module.copy_weight, self.config.answer_copy_weight_init)

    def answer_occurrences(self, knowledge_input_ids: torch.Tensor) -> torch.Tensor:
        """`(B, K, L, num_labels)` 1.0 where answer `a`'s token sequence starts at token `l` of entry `k`."""
        answers = self.answer_token_ids.to(knowledge_input_ids.device)
        occurs = knowledge_input_ids.new_ones(*knowledge_input_ids.shape, answers.shape[0], dtype=torch.bool)
        for offset in range(answers.shape[1]):
            shifted = F.pad(knowledge_input_ids[..., offset:], (0, offset), value=-2)
            wanted = answers[:, offset]
            occurs &= (shifted.unsqueeze(-1) == wanted) | (wanted < 0)
        return occurs.to(torch.float32)

    def copy_scores(self, fused_cls, knowledge, knowledge_input_ids, knowledge_attention_mask) -> torch.Tensor | None:
        """Probability mass that the pointer puts on each answer's occurrences in the retrieved entries `(B, A)`:
        sum over entries of p(entry | query) * sum over the answer's occurrences of p(token | entry, question).
        p(entry | query) is the softmax of retrieval score / temperature plus the relevance gate logit."""
        if knowledge["states"] is None or not self.config.answer_token_ids:
            return None
        states = knowledge["states"]
        pointer = torch.einsum("bh,bklh->bkl", self.copy_query(fused_cls), self.copy_key(states))
        pointer = (pointer / math.sqrt(fused_cls.shape[-1])).float()
        token_mask = knowledge_attention_mask.bool()
        pointer = pointer.masked_fill(~token_mask, torch.finfo(pointer.dtype).min).softmax(dim=-1)
        valid_entries = token_mask.any(dim=-1)
        entry_logits = knowledge["scores"].float() / self.config.retrieval_temperature + knowledge["gate_logits"].float()
        entry_prior = entry_logits.masked_fill(~valid_entries, torch.finfo(entry_logits.dtype).min).softmax(dim=-1)
        token_probability = entry_prior.unsqueeze(-1) * pointer * token_mask
        return torch.einsum("bkl,bkla->ba", token_probability, self.answer_occurrences(knowledge_input_ids))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        knowledge_input_ids: torch.Tensor | None = None,
        knowledge_attention_mask: torch.Tensor | None = None,
        knowledge_scores: torch.Tensor | None = None,
        knowledge_indices: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_knowledge: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ReavlTaskOutput:
        r"""
        labels (`torch.FloatTensor` of shape `(batch, num_labels)`, *optional*): soft answer scores in [0, 1]
            (e.g. min(#annotators giving the answer / 3, 1)).
        """
        parts = self.reavl.run_parts(
            pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask,
            knowledge_scores, knowledge_indices, use_knowledge,
        )
        logits = self.vqa_head(parts["fused"][:, 0])
        if self.config.answer_token_ids and parts["knowledge"]["states"] is not None:
            knowledge_ids = parts["knowledge_input_ids"]
            copied = self.copy_scores(
                parts["fused"][:, 0], parts["knowledge"], knowledge_ids, parts["knowledge_attention_mask"]
            )
            logits = logits + self.copy_weight * copied.to(logits.dtype)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape:
                raise ValueError(
                    f"labels must be soft answer scores of shape (batch, num_labels) = {tuple(logits.shape)}, "
                    f"got {tuple(labels.shape)}"
                )
            loss = soft_target_bce_loss(logits, labels.to(logits.dtype))
        return self._task_output(loss, logits, parts)


class ReavlForEntityLinking(_ReavlTaskModel):
    """Multimodal entity linking: scores a mention (sentence + image, with the mention span) against knowledge
    entries. The candidates are the knowledge entries (retrieved, with the gold one forced in during training by
    the collator); the loss is a cross-entropy over the candidates.

    Score of candidate k: `(<W_m mention, W_e entry_k> / sqrt(d) + w * retrieval_logit_k) / T`, where the mention
    vector is the fused states averaged over the mention span (the fused [CLS] without a span). `W_m` starts at zero,
    so an untrained head ranks exactly as the retriever, and fine-tuning adds the head's own evidence at the rate of
    any weight matrix (a scalar gate on the similarity barely moves at the 1e-4 learning rates of pretrained towers:
    0.02 after 431 WikiMEL steps); `w` starts at 1.

    `use_knowledge=False` is the no-knowledge ablation: the mention is fused without the entries' tokens and the
    candidates are scored by similarity alone, without the retrieval score; the fine-tuning and evaluation scripts
    then pass each candidate as its title only (`training.finetune.ReavlTrainer.title_entries`).
    """

    def __init__(self, config: ReavlConfig):
        super().__init__(config)
        self.reavl = ReavlModel(config)
        hidden = config.text_config.hidden_size
        self.mention_projection = nn.Linear(hidden, hidden)
        self.entity_projection = nn.Linear(config.knowledge_encoder_config.hidden_size, hidden)
        self.retrieval_weight = nn.Parameter(torch.ones(1))
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            init.ones_(module.retrieval_weight)
            init.zeros_(module.mention_projection.weight)
            init.zeros_(module.mention_projection.bias)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        knowledge_input_ids: torch.Tensor | None = None,
        knowledge_attention_mask: torch.Tensor | None = None,
        knowledge_scores: torch.Tensor | None = None,
        knowledge_indices: torch.Tensor | None = None,
        mention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_knowledge: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ReavlTaskOutput:
        r"""
        knowledge_input_ids, knowledge_attention_mask (`(batch, K, length)`): the candidate entries (retrieved by an
            attached retriever when absent).
        mention_mask (`(batch, text_length)`, *optional*): 1 on the mention's tokens.
        labels (`torch.LongTensor` of shape `(batch,)`, *optional*): position of the gold entity among the
            candidates (-100 when it is not among them: such examples are left out of the loss).
        """
        parts = self.reavl.run_parts(
            pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask,
            knowledge_scores, knowledge_indices, use_knowledge=True,
        )
        knowledge = parts["knowledge"]
        if knowledge["pooled"] is None:
            raise ValueError(
                "ReavlForEntityLinking needs candidate entries: pass knowledge_input_ids/knowledge_attention_mask "
                "or attach a retriever with set_retriever (and num_knowledge > 0)"
            )
        fused = parts["fused"]
        if not use_knowledge:
            # No-knowledge ablation: the mention is read without the entries' tokens in the fusion.
            fused = self.reavl.fuse(parts["text_states"], parts["attention_mask"], parts["image_states"])
        if mention_mask is not None:
            if mention_mask.shape != fused.shape[:2]:
                raise ValueError(
                    f"mention_mask must have the shape of input_ids {tuple(fused.shape[:2])}, "
                    f"got {tuple(mention_mask.shape)}"
                )
            weights = mention_mask.to(fused.dtype).unsqueeze(-1)
            has_span = weights.sum(dim=1) > 0
            span_mean = (fused * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
            mention = torch.where(has_span, span_mean, fused[:, 0])
        else:
            mention = fused[:, 0]
        mention = self.mention_projection(mention)
        entities = self.entity_projection(knowledge["pooled"])
        temperature = self.config.entity_linking_temperature
        similarity = torch.einsum("bh,bkh->bk", mention, entities) / math.sqrt(mention.shape[-1])
        if use_knowledge:
            logits = (similarity + self.retrieval_weight * knowledge["retrieval_logits"]) / temperature
        else:
            # No-knowledge ablation: no retrieval score (the retriever embeds the entries' text) and, as the
            # fine-tuning scripts pass them, candidates given by their titles alone.
            logits = similarity / temperature
        valid_entries = parts["knowledge_attention_mask"].any(dim=-1)
        logits = logits.masked_fill(~valid_entries, torch.finfo(logits.dtype).min)
        loss = None
        if labels is not None:
            if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
                raise ValueError(f"labels must have shape (batch,) = ({logits.shape[0]},), got {tuple(labels.shape)}")
            if (labels != -100).any():
                loss = F.cross_entropy(logits, labels, ignore_index=-100)
            else:
                loss = logits.sum() * 0.0
        return self._task_output(loss, logits, parts)


class ReavlForImageTextRetrieval(_ReavlTaskModel):
    """Image-text retrieval: ITC scores (any number of images against any number of texts, so the built-in
    `zero-shot-image-classification` pipeline works), and optional ITM re-ranking of the top candidates."""

    def __init__(self, config: ReavlConfig):
        super().__init__(config)
        self.reavl = ReavlModel(config)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ReavlImageTextRetrievalOutput:
        r"""
        pixel_values (`(num_images, channels, height, width)`), input_ids / attention_mask (`(num_texts, length)`).
        return_loss (`bool`, *optional*): compute the symmetric ITC loss (needs num_images == num_texts: pairs).
        """
        if pixel_values is None or input_ids is None:
            raise ValueError("ReavlForImageTextRetrieval needs pixel_values and input_ids")
        image_embeds = self.reavl.get_image_features(pixel_values)
        text_embeds = self.reavl.get_text_features(input_ids, attention_mask)
        scale = self.reavl.logit_scale.exp().clamp(max=100.0)
        logits_per_image = scale * image_embeds @ text_embeds.t()
        loss = None
        if return_loss:
            if logits_per_image.shape[0] != logits_per_image.shape[1]:
                raise ValueError(
                    f"return_loss needs paired inputs, got {logits_per_image.shape[0]} images and "
                    f"{logits_per_image.shape[1]} texts"
                )
            targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
            loss = (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets)) / 2
        return ReavlImageTextRetrievalOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )

    @torch.no_grad()
    def itm_scores(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        knowledge_input_ids: torch.Tensor | None = None,
        knowledge_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITM match probability `(batch,)` of aligned (image, text) pairs, through the knowledge-augmented fusion."""
        parts = self.reavl.run_parts(
            pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask
        )
        return self.itm_head(parts["fused"][:, 0]).softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def rerank(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        top_k: int = 16,
    ) -> torch.Tensor:
        """Image-to-text scores `(num_images, num_texts)`: ITC for all pairs, the top-`top_k` texts of each image
        re-scored by ITM (added to the ITC logits, as BLIP's retrieval evaluation does)."""
        logits = self(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits_per_image
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        top_k = min(top_k, logits.shape[1])
        reranked = logits.clone()
        for image_index in range(logits.shape[0]):
            candidates = logits[image_index].topk(top_k).indices
            images = pixel_values[image_index : image_index + 1].expand(top_k, *pixel_values.shape[1:])
            scores = self.itm_scores(images, input_ids[candidates], attention_mask[candidates])
            reranked[image_index, candidates] = logits[image_index, candidates] + scores * logits.abs().max()
        return reranked


class ReavlForImageTextClassification(_ReavlTaskModel):
    """Image-text pair classification: SNLI-VE style (one image, `config.classification_num_images=1`) or NLVR2
    style (two images per statement, `classification_num_images=2`, fused separately and concatenated)."""

    def __init__(self, config: ReavlConfig):
        super().__init__(config)
        self.reavl = ReavlModel(config)
        hidden = config.text_config.hidden_size
        self.classifier = ReavlClassifierHead(config, hidden * config.classification_num_images, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        knowledge_input_ids: torch.Tensor | None = None,
        knowledge_attention_mask: torch.Tensor | None = None,
        knowledge_scores: torch.Tensor | None = None,
        knowledge_indices: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_knowledge: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ReavlTaskOutput:
        r"""
        pixel_values: `(batch, channels, height, width)`, or `(batch, 2, channels, height, width)` for two images.
        labels (`torch.LongTensor` of shape `(batch,)`, *optional*): class ids.
        """
        num_images = self.config.classification_num_images
        if pixel_values is None:
            raise ValueError("ReavlForImageTextClassification needs pixel_values")
        if num_images == 2:
            if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
                raise ValueError(
                    "pixel_values must have shape (batch, 2, channels, height, width) for two-image classification, "
                    f"got {tuple(pixel_values.shape)}"
                )
            pooled, parts = [], None
            for image_slot in range(2):
                parts = self.reavl.run_parts(
                    pixel_values[:, image_slot], input_ids, attention_mask, knowledge_input_ids,
                    knowledge_attention_mask, knowledge_scores, knowledge_indices, use_knowledge,
                )
                pooled.append(parts["fused"][:, 0])
            features = torch.cat(pooled, dim=-1)
        else:
            parts = self.reavl.run_parts(
                pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask,
                knowledge_scores, knowledge_indices, use_knowledge,
            )
            features = parts["fused"][:, 0]
        logits = self.classifier(features)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels)
        return self._task_output(loss, logits, parts)


__all__ = [
    "ReavlPreTrainedModel",
    "ReavlModel",
    "ReavlForPreTraining",
    "ReavlForQuestionAnswering",
    "ReavlForEntityLinking",
    "ReavlForImageTextRetrieval",
    "ReavlForImageTextClassification",
]
