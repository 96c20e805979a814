# Copyright 2026 The REAVL authors. Licensed under the Apache License, Version 2.0.
"""REAVL model configuration.

This file is copied next to the weights by `save_pretrained` and loaded as remote code, so it imports only public
names of installed packages (never `modeling_reavl.` / `processing.` / `training.` by absolute name).
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


FUSION_POOLING_CHOICES = ("mean", "cls")
KNOWLEDGE_POOLING_CHOICES = ("mean", "cls", "attention")
RETRIEVAL_QUERY_CHOICES = ("image_text", "image", "text")

REAVL_AUTO_MAP = {
    "AutoConfig": "configuration_reavl.ReavlConfig",
    "AutoModel": "modeling_reavl.ReavlModel",
    "AutoModelForPreTraining": "modeling_reavl.ReavlForPreTraining",
    "AutoModelForVisualQuestionAnswering": "modeling_reavl.ReavlForQuestionAnswering",
    "AutoModelForZeroShotImageClassification": "modeling_reavl.ReavlForImageTextRetrieval",
    "AutoModelForMultipleChoice": "modeling_reavl.ReavlForEntityLinking",
    "AutoModelForSequenceClassification": "modeling_reavl.ReavlForImageTextClassification",
}


class ReavlConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ReavlModel`]: a vision tower, a text tower, a knowledge encoder (the text tower by default),
    a dense knowledge retriever and a knowledge-augmented fusion encoder.

    The towers are any transformers backbones, given as configs or as dicts carrying a `model_type`; the defaults
    describe a base-size model (ViT-B/16 at 224 px, BERT-base).

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*, defaults to a `ViTConfig()`):
            Config of the vision tower (ViT, CLIP-vision, DeiT, SigLIP-vision, `timm_wrapper`, ...).
        text_config (`dict` or `PreTrainedConfig`, *optional*, defaults to a `BertConfig()`):
            Config of the text tower, a BERT-family encoder.
        knowledge_config (`dict` or `PreTrainedConfig`, *optional*, defaults to `None`):
            Config of a separate knowledge encoder. `None` shares the text tower (see `share_knowledge_encoder`).
        share_knowledge_encoder (`bool`, *optional*, defaults to `True`):
            Encode knowledge entries with the text tower. Ignored (treated as `False`) when `knowledge_config` is given.
        projection_dim (`int`, *optional*, defaults to 256):
            Size of the image-text contrastive (ITC) embeddings.
        retrieval_dim (`int`, *optional*, defaults to 256):
            Size of the retrieval query and key embeddings stored in the knowledge index.
        num_knowledge (`int`, *optional*, defaults to 4):
            Knowledge entries retrieved per example. 0 disables knowledge (the no-knowledge ablation).
        max_knowledge_length (`int`, *optional*, defaults to 64):
            Tokens kept per knowledge entry (title, text and triples rendered as one string).
        num_fusion_layers (`int`, *optional*, defaults to 4):
            Knowledge-augmented fusion layers stacked over the text tokens.
        fusion_num_attention_heads (`int`, *optional*, defaults to 12):
            Attention heads of every fusion attention block; must divide the text hidden size.
        fusion_intermediate_size (`int`, *optional*, defaults to 3072):
            Hidden size of the fusion feed-forward blocks.
        fusion_dropout (`float`, *optional*, defaults to 0.1):
            Dropout in the fusion layers and heads.
        knowledge_gate_init (`float`, *optional*, defaults to 0.0):
            Initial pre-tanh value of the gate through which the knowledge branch enters the residual stream. 0 keeps
            a pretrained text tower intact at the start (as Flamingo's gated cross-attention does).
        relevance_score_weight_init (`float`, *optional*, defaults to 1.0):
            Initial weight of the retrieval score in the per-entry relevance gate logits.
        pooling (`str`, *optional*, defaults to `"mean"`):
            How the text tower and knowledge encoder are pooled into one vector for retrieval and ITC: `"mean"` over
            non-padding tokens (what sentence encoders such as MiniLM are trained for) or `"cls"`.
        knowledge_pooling (`str`, *optional*):
            How knowledge entries are pooled into their retrieval key; `None` (default) uses `pooling`. `"attention"`
            is a learned softmax over the entry's tokens that starts as mean pooling (zero-initialised scorer) and
            can learn to weight the tokens that identify an entry (its name) over the template words that every
            entry shares; mean pooling of long templated entries gives near-identical keys to an untrained tower.
        retrieval_query_modalities (`str`, *optional*, defaults to `"image_text"`):
            What the retrieval query of `forward` (and of `get_query_embeddings` given both) is built from:
            `"image_text"` (the image and the text), `"image"` (tasks whose text never names what to look up, e.g.
            "what language is spoken in the country of this flag?") or `"text"` (text-only knowledge lookups).
            Pre-training aligns all three kinds of query, so a pre-trained model can be fine-tuned with any.
        retrieval_temperature (`float`, *optional*, defaults to 0.05):
            Temperature of the retriever's softmax over retrieved entries (retriever learning).
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial log of the ITC logit scale (CLIP's 1/0.07).
        mlm_probability (`float`, *optional*, defaults to 0.15):
            Share of tokens masked for knowledge-augmented MLM (entity mentions are masked first).
        num_kg_relations (`int`, *optional*, defaults to 64):
            Size of the relation vocabulary of the KG relational-reasoning scorer.
        kg_relations (`list[str]`, *optional*, defaults to `None`):
            Names of the relations, position = relation id; saved so link prediction stays interpretable.
        itc_loss_weight / knowledge_alignment_loss_weight / mlm_loss_weight / itm_loss_weight / kg_loss_weight /
        retriever_loss_weight / relevance_loss_weight (`float`, *optional*, defaults to 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5):
            Weights of the pre-training losses in their sum.
        num_itm_hard_negatives (`int`, *optional*, defaults to 1):
            Hard negatives mined per example and direction from the ITC similarities for ITM.
        itm_max_examples (`int`, *optional*, defaults to `None`):
            Cap on the examples of a batch that anchor ITM pairs (each costs `1 + 2 * num_itm_hard_negatives` fusion
            passes); `None` uses the whole batch.
        entity_linking_temperature (`float`, *optional*, defaults to 0.05):
            Temperature of the entity-linking candidate softmax.
        answer_token_ids (`list[list[int]]`, *optional*):
            Token ids of each VQA answer label (in label order, without special tokens). When set,
            `ReavlForQuestionAnswering` adds a copy score to each answer's logit: a pointer over the retrieved entries'
            tokens, weighted by each entry's retrieval posterior, summed over the places where the answer's tokens
            occur. Fine-tuning sets it from the tokenizer; `None` keeps the plain classifier.
        answer_copy_weight_init (`float`, *optional*, defaults to 5.0):
            Initial weight of that copy score in the answer logits.
        classification_num_images (`int`, *optional*, defaults to 1):
            Images per example of the pair-classification head (1: SNLI-VE style, 2: NLVR2 style).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal init of the REAVL-specific layers.
        layer_norm_eps (`float`, *optional*, defaults to 1e-12):
            Epsilon of the fusion layer norms.

    Example:

    ```python
    >>> from transformers import BertConfig, ViTConfig
    >>> config = ReavlConfig(
    ...     vision_config=ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
    ...                             num_attention_heads=2, intermediate_size=128),
    ...     text_config={"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
    ...                  "num_attention_heads": 2, "intermediate_size": 128},
    ...     num_fusion_layers=1, fusion_num_attention_heads=2, fusion_intermediate_size=128, num_knowledge=3,
    ... )
    ```
    """

    model_type = "reavl"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "knowledge_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    knowledge_config: dict | PreTrainedConfig | None = None
    share_knowledge_encoder: bool = True
    projection_dim: int = 256
    retrieval_dim: int = 256
    num_knowledge: int = 4
    max_knowledge_length: int = 64
    num_fusion_layers: int = 4
    fusion_num_attention_heads: int = 12
    fusion_intermediate_size: int = 3072
    fusion_dropout: float = 0.1
    knowledge_gate_init: float = 0.0
    relevance_score_weight_init: float = 1.0
    pooling: str = "mean"
    knowledge_pooling: str | None = None
    retrieval_query_modalities: str = "image_text"
    retrieval_temperature: float = 0.05
    logit_scale_init_value: float = 2.6592
    mlm_probability: float = 0.15
    num_kg_relations: int = 64
    kg_relations: list[str] | None = None
    itc_loss_weight: float = 1.0
    knowledge_alignment_loss_weight: float = 1.0
    mlm_loss_weight: float = 1.0
    itm_loss_weight: float = 1.0
    kg_loss_weight: float = 0.5
    retriever_loss_weight: float = 0.5
    relevance_loss_weight: float = 0.5
    num_itm_hard_negatives: int = 1
    itm_max_examples: int | None = None
    entity_linking_temperature: float = 0.05
    answer_token_ids: list[list[int]] | None = None
    answer_copy_weight_init: float = 5.0
    classification_num_images: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Every Auto class REAVL serves, so a saved folder loads through any of them with trust_remote_code=True
        # (save_pretrained only adds the saved class's own entry).
        self.auto_map = {**REAVL_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        if self.knowledge_config is not None:
            self.share_knowledge_encoder = False
        if self.pooling not in FUSION_POOLING_CHOICES:
            raise ValueError(f"pooling must be one of {FUSION_POOLING_CHOICES}, got {self.pooling!r}")
        if self.knowledge_pooling is not None and self.knowledge_pooling not in KNOWLEDGE_POOLING_CHOICES:
            raise ValueError(
                f"knowledge_pooling must be None or one of {KNOWLEDGE_POOLING_CHOICES}, got {self.knowledge_pooling!r}"
            )
        if self.retrieval_query_modalities not in RETRIEVAL_QUERY_CHOICES:
            raise ValueError(
                f"retrieval_query_modalities must be one of {RETRIEVAL_QUERY_CHOICES}, got "
                f"{self.retrieval_query_modalities!r}"
            )
        if self.num_knowledge < 0:
            raise ValueError(f"num_knowledge must be >= 0 (0 disables knowledge), got {self.num_knowledge}")
        text_hidden = self.text_config.hidden_size
        if text_hidden % self.fusion_num_attention_heads != 0:
            raise ValueError(
                f"fusion_num_attention_heads={self.fusion_num_attention_heads} must divide the text hidden size "
                f"{text_hidden}"
            )
        if self.kg_relations is not None and len(self.kg_relations) > self.num_kg_relations:
            raise ValueError(
                f"kg_relations lists {len(self.kg_relations)} relations but num_kg_relations={self.num_kg_relations}"
            )
        if self.answer_token_ids is not None and (
            not all(isinstance(tokens, (list, tuple)) and len(tokens) > 0 for tokens in self.answer_token_ids)
        ):
            raise ValueError("answer_token_ids must be a list with a non-empty list of token ids per answer label")
        if self.classification_num_images not in (1, 2):
            raise ValueError(f"classification_num_images must be 1 or 2, got {self.classification_num_images}")

    @property
    def knowledge_encoder_config(self) -> PreTrainedConfig:
        """The config of the tower that encodes knowledge entries (the text tower when shared)."""
        return self.text_config if self.knowledge_config is None else self.knowledge_config


__all__ = ["ReavlConfig"]
