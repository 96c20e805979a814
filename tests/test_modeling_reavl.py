"""REAVL model tests (issue 2), in the style of transformers' model tests.

`ReavlModelTester` builds a tiny config (hidden 32, 2 layers, 30 px images with 2 px patches, a 99-token BERT
vocabulary) and random inputs, so the whole file runs on a CPU in well under a minute. The tests read as examples of
what a user relies on: output shapes, the knowledge gates, the pre-training losses and where their gradients go,
save/load, gradient checkpointing, bf16 autocast, input validation, loading an exported folder as Hub remote code
without this repository, and building REAVL around real MiniLM weights.
"""

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoTokenizer, ViTConfig, ViTModel

import modeling_reavl  # noqa: F401  (registers REAVL with the Auto classes)
from modeling_reavl import ReavlConfig, ReavlForPreTraining, ReavlModel
from tests.conftest import minilm_path
from tests.remote_code_helpers import IsolatedRunError, run_isolated, run_isolated_json


PRETRAINING_LOSSES = (
    "itc_loss",
    "knowledge_alignment_loss",
    "mlm_loss",
    "itm_loss",
    "kg_loss",
    "retriever_loss",
    "relevance_loss",
)


class ReavlModelTester:
    """Tiny REAVL config and random inputs (as transformers' `...ModelTester` classes build them)."""

    def __init__(
        self,
        batch_size=3,
        text_length=7,
        num_knowledge=3,
        knowledge_length=5,
        image_size=30,
        patch_size=2,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        projection_dim=16,
        retrieval_dim=16,
        num_fusion_layers=2,
        num_kg_relations=5,
    ):
        self.batch_size = batch_size
        self.text_length = text_length
        self.num_knowledge = num_knowledge
        self.knowledge_length = knowledge_length
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.vocab_size = vocab_size
        self.projection_dim = projection_dim
        self.retrieval_dim = retrieval_dim
        self.num_fusion_layers = num_fusion_layers
        self.num_kg_relations = num_kg_relations

    @property
    def num_image_positions(self) -> int:
        # ViT prepends a [CLS] token to the patches.
        return (self.image_size // self.patch_size) ** 2 + 1

    def get_vision_config(self) -> ViTConfig:
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )

    def get_config(self, **overrides) -> ReavlConfig:
        """Dropout is 0 everywhere so that train-mode passes (gradient checks, optimisation) are deterministic."""
        kwargs = dict(
            vision_config=self.get_vision_config().to_dict(),
            text_config={
                "model_type": "bert",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "intermediate_size": self.intermediate_size,
                "max_position_embeddings": 64,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
            },
            projection_dim=self.projection_dim,
            retrieval_dim=self.retrieval_dim,
            num_knowledge=self.num_knowledge,
            max_knowledge_length=self.knowledge_length,
            num_fusion_layers=self.num_fusion_layers,
            fusion_num_attention_heads=self.num_attention_heads,
            fusion_intermediate_size=self.intermediate_size,
            fusion_dropout=0.0,
            num_kg_relations=self.num_kg_relations,
        )
        kwargs.update(overrides)
        return ReavlConfig(**kwargs)

    def prepare_inputs(self, batch_size=None, num_knowledge=None, seed=0) -> dict[str, torch.Tensor]:
        """Images, padded texts and (when `num_knowledge` > 0) padded knowledge entries with scores and indices."""
        batch_size = self.batch_size if batch_size is None else batch_size
        num_knowledge = self.num_knowledge if num_knowledge is None else num_knowledge
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(4, self.vocab_size, (batch_size, self.text_length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[-1, -2:] = 0  # the last text is shorter: padding must be ignored
        input_ids[attention_mask == 0] = 0
        inputs = {
            "pixel_values": torch.randn(
                batch_size, self.num_channels, self.image_size, self.image_size, generator=generator
            ),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
        if num_knowledge > 0:
            shape = (batch_size, num_knowledge, self.knowledge_length)
            knowledge_attention_mask = torch.ones(shape, dtype=torch.long)
            knowledge_attention_mask[:, -1, -2:] = 0  # the last entry of every example is shorter
            knowledge_input_ids = torch.randint(4, self.vocab_size, shape, generator=generator)
            knowledge_input_ids[knowledge_attention_mask == 0] = 0
            inputs.update(
                knowledge_input_ids=knowledge_input_ids,
                knowledge_attention_mask=knowledge_attention_mask,
                knowledge_scores=torch.rand(batch_size, num_knowledge, generator=generator),
                knowledge_indices=torch.arange(batch_size * num_knowledge).reshape(batch_size, num_knowledge),
            )
        return inputs

    def prepare_pretraining_inputs(self, seed=0) -> dict[str, torch.Tensor]:
        """`prepare_inputs` plus the targets of every pre-training loss."""
        inputs = self.prepare_inputs(seed=seed)
        batch_size, num_knowledge = self.batch_size, self.num_knowledge
        knowledge_labels = torch.zeros(batch_size, num_knowledge, dtype=torch.long)
        knowledge_labels[torch.arange(batch_size), torch.arange(batch_size) % num_knowledge] = 1
        mlm_input_ids = inputs["input_ids"].clone()
        mlm_labels = torch.full_like(mlm_input_ids, -100)
        mlm_labels[:, 1:3] = mlm_input_ids[:, 1:3]
        mlm_input_ids[:, 1:3] = 3  # the [MASK] id of this tiny vocabulary
        # [head slot in 0..K-1, relation id, tail slot in 0..B*K-1]; the second triple of the last example is padding.
        kg_triples = torch.tensor(
            [
                [[0, 1, 1], [1, 2, 5]],
                [[1, 0, 3], [2, 4, 8]],
                [[2, 3, 0], [-1, -1, -1]],
            ]
        )
        return {
            **inputs,
            "knowledge_labels": knowledge_labels,
            "mlm_input_ids": mlm_input_ids,
            "mlm_labels": mlm_labels,
            "kg_triples": kg_triples,
        }


@pytest.fixture(scope="module")
def tester():
    return ReavlModelTester()


def _model(tester, model_class=ReavlModel, seed=0, **config_overrides):
    torch.manual_seed(seed)
    return model_class(tester.get_config(**config_overrides)).eval()


def _without_knowledge(inputs):
    return {name: value for name, value in inputs.items() if not name.startswith("knowledge")}


def _set_knowledge_gates(model: ReavlModel, value: float) -> None:
    with torch.no_grad():
        for layer in model.fusion_layers:
            layer.knowledge_gate.fill_(value)


# --------------------------------------------------------------------------------------------------------------------
# ReavlModel: outputs and the knowledge path
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("num_knowledge", [0, 3])
def test_model_output_shapes(tester, batch_size, num_knowledge):
    model = _model(tester, num_knowledge=num_knowledge)
    inputs = tester.prepare_inputs(batch_size=batch_size, num_knowledge=num_knowledge)
    with torch.no_grad():
        outputs = model(**inputs)

    text, hidden, patches = tester.text_length, tester.hidden_size, tester.num_image_positions
    assert outputs.last_hidden_state.shape == (batch_size, text, hidden)
    assert outputs.pooler_output.shape == (batch_size, hidden)
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 0])
    assert outputs.image_embeds.shape == (batch_size, tester.projection_dim)
    assert outputs.text_embeds.shape == (batch_size, tester.projection_dim)
    assert outputs.query_embeds.shape == (batch_size, tester.retrieval_dim)
    assert outputs.knowledge_embeds.shape == (batch_size, num_knowledge, tester.retrieval_dim)
    for name in ("retrieval_logits", "knowledge_scores", "knowledge_gate_logits", "knowledge_gates"):
        assert getattr(outputs, name).shape == (batch_size, num_knowledge), name
    assert outputs.image_hidden_states.shape == (batch_size, patches, hidden)
    assert outputs.text_hidden_states.shape == (batch_size, text, hidden)
    assert torch.isfinite(outputs.last_hidden_state).all()

    if num_knowledge:
        # The evidence a caller shows: which index rows were used, with the index's scores and the learned gates.
        torch.testing.assert_close(outputs.knowledge_indices, inputs["knowledge_indices"])
        torch.testing.assert_close(outputs.knowledge_scores, inputs["knowledge_scores"])
        torch.testing.assert_close(outputs.knowledge_gates, torch.sigmoid(outputs.knowledge_gate_logits))
        assert ((outputs.knowledge_gates > 0) & (outputs.knowledge_gates < 1)).all()
        # retrieval_logits are the current retriever's scores: query · key, both unit vectors.
        expected_logits = torch.einsum("br,bkr->bk", outputs.query_embeds, outputs.knowledge_embeds)
        torch.testing.assert_close(outputs.retrieval_logits, expected_logits)
        assert outputs.retrieval_logits.abs().max() <= 1 + 1e-5
    else:
        assert outputs.knowledge_indices is None


def test_gates_use_retrieval_logits_when_no_scores_are_given(tester):
    model = _model(tester)
    inputs = tester.prepare_inputs()
    inputs.pop("knowledge_scores")
    with torch.no_grad():
        outputs = model(**inputs)
    torch.testing.assert_close(outputs.knowledge_scores, outputs.retrieval_logits)


def test_closed_knowledge_gate_at_init_leaves_fused_states_unchanged(tester):
    # knowledge_gate_init=0 -> tanh(0) = 0: the knowledge branch adds exactly nothing, as Flamingo's gated
    # cross-attention starts, so a pretrained text tower is intact at the start of pre-training.
    model = _model(tester)
    assert all(layer.knowledge_gate.item() == 0.0 for layer in model.fusion_layers)
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        with_knowledge = model(**inputs).last_hidden_state
        without_knowledge = model(**_without_knowledge(inputs)).last_hidden_state
    assert torch.equal(with_knowledge, without_knowledge)


def test_open_knowledge_gate_lets_knowledge_change_fused_states(tester):
    model = _model(tester)
    _set_knowledge_gates(model, 1.0)
    inputs = tester.prepare_inputs()
    other_knowledge = tester.prepare_inputs(seed=1)
    with torch.no_grad():
        with_knowledge = model(**inputs).last_hidden_state
        without_knowledge = model(**_without_knowledge(inputs)).last_hidden_state
        with_other_knowledge = model(
            **{**inputs, **{name: other_knowledge[name] for name in other_knowledge if name.startswith("knowledge")}}
        ).last_hidden_state
    # Every text token reads the knowledge (padding positions included, they are only masked as keys).
    assert (with_knowledge - without_knowledge).abs().amax(dim=-1).min() > 1e-3
    # And what it reads matters: other entries give other fused states.
    assert (with_knowledge - with_other_knowledge).abs().max() > 1e-3


def test_knowledge_gate_init_is_configurable(tester):
    model = _model(tester, knowledge_gate_init=0.5)
    assert [layer.knowledge_gate.item() for layer in model.fusion_layers] == [0.5, 0.5]


def test_entry_with_near_zero_relevance_gate_is_ignored(tester):
    # Attention to an entry's tokens is weighted by its relevance gate: an entry whose retrieval score drives its
    # gate to ~0 contributes as if it had not been retrieved at all.
    model = _model(tester)
    _set_knowledge_gates(model, 1.0)
    inputs = tester.prepare_inputs()
    scores = inputs["knowledge_scores"].clone()
    scores[:, -1] = -1e4  # relevance logit += score_weight (1.0 at init) * -1e4 -> gate ~ 0
    only_first_two = {
        **inputs,
        "knowledge_input_ids": inputs["knowledge_input_ids"][:, :2],
        "knowledge_attention_mask": inputs["knowledge_attention_mask"][:, :2],
        "knowledge_scores": scores[:, :2],
        "knowledge_indices": inputs["knowledge_indices"][:, :2],
    }
    with torch.no_grad():
        gated_out = model(**{**inputs, "knowledge_scores": scores})
        dropped = model(**only_first_two)
        kept = model(**inputs)
    assert gated_out.knowledge_gates[:, -1].max() < 1e-6
    torch.testing.assert_close(gated_out.knowledge_gates[:, :2], dropped.knowledge_gates)
    torch.testing.assert_close(gated_out.last_hidden_state, dropped.last_hidden_state, atol=1e-4, rtol=0)
    # With its ordinary score the third entry does change the result.
    assert (kept.last_hidden_state - dropped.last_hidden_state).abs().max() > 1e-3


def test_no_knowledge_path_needs_no_knowledge_tensors(tester):
    model = _model(tester)
    _set_knowledge_gates(model, 1.0)
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        plain = model(**_without_knowledge(inputs))
        empty = model(
            **_without_knowledge(inputs),
            knowledge_input_ids=torch.zeros(tester.batch_size, 0, tester.knowledge_length, dtype=torch.long),
            knowledge_attention_mask=torch.zeros(tester.batch_size, 0, tester.knowledge_length, dtype=torch.long),
        )
    assert plain.knowledge_gates.shape == (tester.batch_size, 0)
    assert plain.knowledge_embeds.shape == (tester.batch_size, 0, tester.retrieval_dim)
    assert plain.knowledge_indices is None
    assert torch.isfinite(plain.last_hidden_state).all()
    # Zero retrieved entries (an empty retrieval) is the same as none.
    assert empty.knowledge_gates.shape == (tester.batch_size, 0)
    assert torch.equal(empty.last_hidden_state, plain.last_hidden_state)


def test_use_knowledge_false_and_num_knowledge_zero_ignore_given_knowledge(tester):
    model = _model(tester)
    _set_knowledge_gates(model, 1.0)
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        plain = model(**_without_knowledge(inputs)).last_hidden_state
        ablated = model(**inputs, use_knowledge=False)
    assert ablated.knowledge_gates.shape == (tester.batch_size, 0)
    assert ablated.knowledge_indices is None
    assert torch.equal(ablated.last_hidden_state, plain)

    # A num_knowledge=0 checkpoint (the no-knowledge ablation) ignores knowledge tensors too.
    ablation_model = _model(tester, num_knowledge=0)
    _set_knowledge_gates(ablation_model, 1.0)
    with torch.no_grad():
        given = ablation_model(**inputs)
        not_given = ablation_model(**_without_knowledge(inputs))
    assert given.knowledge_gates.shape == (tester.batch_size, 0)
    assert torch.equal(given.last_hidden_state, not_given.last_hidden_state)


def test_padding_tokens_do_not_change_the_other_tokens(tester):
    # Two padding tokens more at the end of every text must leave every real token's fused state alone.
    model = _model(tester)
    _set_knowledge_gates(model, 1.0)
    inputs = tester.prepare_inputs()
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([inputs["input_ids"], torch.zeros(tester.batch_size, 2, dtype=torch.long)], 1)
    padded["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.zeros(tester.batch_size, 2, dtype=torch.long)], 1
    )
    with torch.no_grad():
        short = model(**inputs)
        long = model(**padded)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(long.last_hidden_state[:, : tester.text_length][real], short.last_hidden_state[real])
    torch.testing.assert_close(long.query_embeds, short.query_embeds)
    torch.testing.assert_close(long.knowledge_gates, short.knowledge_gates)


# --------------------------------------------------------------------------------------------------------------------
# Unimodal features and the retriever
# --------------------------------------------------------------------------------------------------------------------


def test_feature_getters_shapes_unit_norm_and_agreement_with_forward(tester):
    model = _model(tester)
    inputs = tester.prepare_inputs()
    batch_size = tester.batch_size
    with torch.no_grad():
        outputs = model(**inputs)
        image_features = model.get_image_features(inputs["pixel_values"])
        text_features = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        flat_ids = inputs["knowledge_input_ids"].reshape(-1, tester.knowledge_length)
        flat_mask = inputs["knowledge_attention_mask"].reshape(-1, tester.knowledge_length)
        knowledge_features = model.get_knowledge_features(flat_ids, flat_mask)
        queries = {
            "image and text": model.get_query_embeddings(
                inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
            ),
            "image only": model.get_query_embeddings(pixel_values=inputs["pixel_values"]),
            "text only": model.get_query_embeddings(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ),
        }

    assert image_features.shape == (batch_size, tester.projection_dim)
    assert text_features.shape == (batch_size, tester.projection_dim)
    assert knowledge_features.shape == (batch_size * tester.num_knowledge, tester.retrieval_dim)
    for name, features in [("image", image_features), ("text", text_features), ("knowledge", knowledge_features)]:
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(features.shape[0]), msg=name)
    for name, query in queries.items():
        assert query.shape == (batch_size, tester.retrieval_dim), name
        torch.testing.assert_close(query.norm(dim=-1), torch.ones(batch_size), msg=name)
    # The getters are what forward uses (an index built with get_knowledge_features matches forward's keys).
    torch.testing.assert_close(image_features, outputs.image_embeds)
    torch.testing.assert_close(text_features, outputs.text_embeds)
    torch.testing.assert_close(queries["image and text"], outputs.query_embeds)
    torch.testing.assert_close(knowledge_features.reshape(outputs.knowledge_embeds.shape), outputs.knowledge_embeds)


def test_get_query_embeddings_needs_an_input(tester):
    model = _model(tester)
    with pytest.raises(ValueError, match="get_query_embeddings needs pixel_values, input_ids or both"):
        model.get_query_embeddings()


def test_retrieval_starts_as_the_text_towers_cosine_similarity(tester):
    # retrieval_dim == text hidden size: the shared orthogonal map preserves inner products exactly.
    model = _model(tester, retrieval_dim=tester.hidden_size)
    head = model.retrieval_head
    assert torch.equal(head.query_text_weight, head.key_weight)
    # The image part of the query starts small (std = initializer_range): defined for image-only queries, negligible
    # beside the text part.
    assert 0 < head.query_image_weight.std().item() < 0.05
    eye = torch.eye(tester.hidden_size)
    torch.testing.assert_close(head.query_text_weight @ head.query_text_weight.t(), eye, atol=1e-5, rtol=0)

    inputs = tester.prepare_inputs()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        queries = model.get_query_embeddings(input_ids=ids, attention_mask=mask)
        keys = model.get_knowledge_features(ids, mask)
        _, pooled = model.encode_text(ids, mask)
    similarity = queries @ keys.t()
    # A text retrieves itself with score 1 ...
    torch.testing.assert_close(similarity.diagonal(), torch.ones(tester.batch_size), atol=1e-5, rtol=0)
    # ... and every other text with the text tower's own cosine similarity.
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(similarity, pooled @ pooled.t(), atol=1e-5, rtol=0)


def test_narrow_retrieval_dim_still_scores_a_text_against_itself_as_one(tester):
    model = _model(tester)  # retrieval_dim 16 < hidden 32: a semi-orthogonal map, still shared by query and key
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        queries = model.get_query_embeddings(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        keys = model.get_knowledge_features(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close((queries * keys).sum(-1), torch.ones(tester.batch_size), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# ReavlForPreTraining: losses, gradients, optimisation
# --------------------------------------------------------------------------------------------------------------------

LOSS_WEIGHTS = {
    "itc_loss_weight": 1.0,
    "knowledge_alignment_loss_weight": 0.7,
    "mlm_loss_weight": 1.3,
    "itm_loss_weight": 0.9,
    "kg_loss_weight": 0.4,
    "retriever_loss_weight": 0.6,
    "relevance_loss_weight": 0.2,
}

# loss -> parameters that must receive a non-zero gradient from it / parameters it must leave alone
GRADIENT_ROUTES = {
    "itc_loss": (
        ["reavl.image_projection.weight", "reavl.text_projection.weight", "reavl.logit_scale"],
        ["mlm_head.decoder.weight", "itm_head.weight", "reavl.fusion_layers.0.feed_forward.fc1.weight"],
    ),
    "knowledge_alignment_loss": (
        [
            "reavl.retrieval_head.query_text_weight",
            "reavl.retrieval_head.query_image_weight",
            "reavl.retrieval_head.key_weight",
        ],
        ["reavl.image_projection.weight", "itm_head.weight", "reavl.relevance_gate.score_weight"],
    ),
    "mlm_loss": (
        [
            "mlm_head.decoder.weight",
            "mlm_head.transform.weight",
            "reavl.fusion_layers.1.feed_forward.fc2.weight",
            "reavl.text_model.embeddings.word_embeddings.weight",
        ],
        ["itm_head.weight", "kg_relation_embeddings.weight"],
    ),
    "itm_loss": (
        ["itm_head.weight", "itm_head.bias", "reavl.fusion_layers.0.image_attention.q_proj.weight"],
        ["mlm_head.decoder.weight", "kg_relation_embeddings.weight"],
    ),
    "kg_loss": (
        ["kg_relation_embeddings.weight", "kg_entity_projection.weight", "kg_head_projection.weight"],
        ["mlm_head.decoder.weight", "itm_head.weight"],
    ),
    "retriever_loss": (
        [
            "reavl.retrieval_head.query_text_weight",
            "reavl.retrieval_head.query_image_weight",
            "reavl.retrieval_head.key_weight",
        ],
        # The target is the gates' posterior, detached: the retriever learns from the gates, not the reverse.
        ["reavl.relevance_gate.query_projection.weight", "reavl.relevance_gate.score_weight"],
    ),
    "relevance_loss": (
        [
            "reavl.relevance_gate.query_projection.weight",
            "reavl.relevance_gate.entry_projection.weight",
            "reavl.relevance_gate.score_weight",
            "reavl.relevance_gate.bias",
        ],
        ["reavl.retrieval_head.query_image_weight", "itm_head.weight"],
    ),
}


def _pretraining_model(tester, seed=0, **overrides):
    model = _model(tester, ReavlForPreTraining, seed=seed, **{**LOSS_WEIGHTS, **overrides})
    _set_knowledge_gates(model.reavl, 0.5)  # let the knowledge branch carry gradient through the fusion
    return model.train()


def _forward_seeded(model, inputs, seed=0):
    torch.manual_seed(seed)  # ITM samples its hard negatives
    return model(**inputs)


def test_every_pretraining_loss_is_finite_and_the_total_is_their_weighted_sum(tester):
    model = _pretraining_model(tester)
    outputs = _forward_seeded(model, tester.prepare_pretraining_inputs())
    for name in PRETRAINING_LOSSES:
        value = getattr(outputs, name)
        assert value is not None and value.dim() == 0 and torch.isfinite(value) and value > 0, name
    expected = sum(LOSS_WEIGHTS[f"{name}_weight"] * getattr(outputs, name) for name in PRETRAINING_LOSSES)
    torch.testing.assert_close(outputs.loss, expected)

    batch_size, num_knowledge = tester.batch_size, tester.num_knowledge
    assert outputs.logits_per_image.shape == (batch_size, batch_size)
    torch.testing.assert_close(outputs.logits_per_text, outputs.logits_per_image.t())
    assert outputs.mlm_logits.shape == (batch_size, tester.text_length, tester.vocab_size)
    # One hard negative per example and direction: B positives, then 2B negatives.
    assert outputs.itm_logits.shape == (3 * batch_size, 2)
    assert outputs.knowledge_gates.shape == (batch_size, num_knowledge)
    assert outputs.retrieval_logits.shape == (batch_size, num_knowledge)


def test_itc_and_mlm_losses_start_near_chance(tester):
    # Random init: ITC is ~log(batch), MLM is ~log(vocab): a loss far from chance at init means a wiring bug.
    model = _pretraining_model(tester)
    outputs = _forward_seeded(model, tester.prepare_pretraining_inputs())
    assert abs(outputs.itc_loss.item() - math.log(tester.batch_size)) < 0.5
    assert abs(outputs.mlm_loss.item() - math.log(tester.vocab_size)) < 0.5


@pytest.mark.parametrize("loss_name", list(GRADIENT_ROUTES))
def test_each_loss_sends_gradient_where_it_should(tester, loss_name):
    model = _pretraining_model(tester)
    outputs = _forward_seeded(model, tester.prepare_pretraining_inputs())
    getattr(outputs, loss_name).backward()
    parameters = dict(model.named_parameters())
    reached, untouched = GRADIENT_ROUTES[loss_name]
    for name in reached:
        grad = parameters[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{loss_name} -> {name}"
    for name in untouched:
        grad = parameters[name].grad
        assert grad is None or grad.abs().sum() == 0, f"{loss_name} should not reach {name}"


def test_losses_are_computed_only_when_their_targets_are_given(tester):
    model = _pretraining_model(tester)
    inputs = tester.prepare_pretraining_inputs()
    with torch.no_grad():
        no_targets = _forward_seeded(model, tester.prepare_inputs())
        no_knowledge = _forward_seeded(
            model, {name: value for name, value in inputs.items() if not name.startswith(("knowledge", "kg"))}
        )
        single = _forward_seeded(model, tester.prepare_inputs(batch_size=1, num_knowledge=0))
    # Knowledge given without labels: ITC, ITM and the retriever distillation (its target is the gates).
    assert [name for name in PRETRAINING_LOSSES if getattr(no_targets, name) is not None] == [
        "itc_loss", "itm_loss", "retriever_loss"
    ]
    # No knowledge: no knowledge-side losses, the rest still trains.
    assert [name for name in PRETRAINING_LOSSES if getattr(no_knowledge, name) is not None] == [
        "itc_loss", "mlm_loss", "itm_loss"
    ]
    assert no_knowledge.knowledge_gates.shape == (tester.batch_size, 0)
    # One example has no contrastive negatives: nothing to learn from, and no loss at all.
    assert single.loss is None and single.itc_loss is None and single.itm_loss is None


def test_no_parameter_gets_an_exploding_gradient_at_init(tester):
    model = _pretraining_model(tester)
    _forward_seeded(model, tester.prepare_pretraining_inputs()).loss.backward()
    norms = {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}
    worst = max(norms, key=norms.get)
    assert norms[worst] < 1e3, f"{worst} gets a gradient of norm {norms[worst]:.3g}"


def test_thirty_adamw_steps_halve_the_loss_on_a_fixed_batch(tester):
    model = _pretraining_model(tester)
    inputs = tester.prepare_pretraining_inputs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(30):
        loss = _forward_seeded(model, inputs, seed=step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.5 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


# --------------------------------------------------------------------------------------------------------------------
# Serialization, gradient checkpointing, autocast
# --------------------------------------------------------------------------------------------------------------------


def test_save_and_load_with_auto_model_gives_identical_outputs(tester, tmp_path):
    model = _model(tester)
    _set_knowledge_gates(model, 0.7)  # a non-init value, so a silently re-initialised gate would show
    model.save_pretrained(tmp_path)
    loaded, loading_info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is ReavlModel
    assert not loading_info["missing_keys"] and not loading_info["unexpected_keys"]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ReavlConfig)
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        expected, actual = model(**inputs), loaded.eval()(**inputs)
    for name in ("last_hidden_state", "query_embeds", "knowledge_gates", "image_embeds", "text_embeds"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name


def test_save_and_load_with_auto_model_for_pretraining_gives_identical_losses(tester, tmp_path):
    model = _pretraining_model(tester).eval()
    model.save_pretrained(tmp_path)
    loaded, loading_info = AutoModelForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is ReavlForPreTraining
    assert not loading_info["missing_keys"] and not loading_info["unexpected_keys"]
    inputs = tester.prepare_pretraining_inputs()
    with torch.no_grad():
        expected, actual = _forward_seeded(model, inputs), _forward_seeded(loaded.eval(), inputs)
    for name in ("loss", *PRETRAINING_LOSSES, "mlm_logits", "itm_logits"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tester):
    inputs = tester.prepare_pretraining_inputs()

    def loss_and_gradients(model):
        recomputed = []
        # A pre-hook on the layer's first block: checkpoint recomputation stops early, after the last saved tensor.
        hook = model.reavl.fusion_layers[0].self_attention.register_forward_pre_hook(
            lambda *args: recomputed.append(1)
        )
        loss = _forward_seeded(model, inputs).loss
        loss.backward()
        hook.remove()
        gradients = {name: parameter.grad for name, parameter in model.named_parameters()}
        # ITM fuses a second batch through the same layer: 3 fusion calls per forward (main, MLM, ITM).
        return loss, gradients, len(recomputed)

    plain_loss, plain_gradients, plain_calls = loss_and_gradients(_pretraining_model(tester))
    checkpointed = _pretraining_model(tester)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        checkpointed.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in checkpointed.reavl.fusion_layers)
    checkpointed_loss, checkpointed_gradients, checkpointed_calls = loss_and_gradients(checkpointed)

    # The fusion layers really were recomputed in backward (each checkpointed call runs its forward twice).
    assert plain_calls == 3 and checkpointed_calls == 2 * plain_calls
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert checkpointed_gradients.keys() == plain_gradients.keys()
    for name, gradient in plain_gradients.items():
        if gradient is None:
            assert checkpointed_gradients[name] is None, name
        else:
            torch.testing.assert_close(checkpointed_gradients[name], gradient, atol=1e-6, rtol=1e-4, msg=name)


def test_cpu_bfloat16_autocast_gives_finite_outputs_and_gradients(tester):
    model = _pretraining_model(tester)
    inputs = tester.prepare_pretraining_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = _forward_seeded(model, inputs)
        base_outputs = model.reavl(**tester.prepare_inputs())
    for name in ("loss", *PRETRAINING_LOSSES):
        assert torch.isfinite(getattr(outputs, name)), name
    for name in ("last_hidden_state", "query_embeds", "knowledge_gates", "image_embeds"):
        assert torch.isfinite(getattr(base_outputs, name)).all(), name
    outputs.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # bf16 is coarse, not wrong: the total stays within a few percent of the float32 loss.
    with torch.no_grad():
        float32_loss = _forward_seeded(model, inputs).loss
    assert abs(outputs.loss.item() - float32_loss.item()) < 0.05 * float32_loss.item()


# --------------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------------


def _bad_inputs(tester, **changes):
    inputs = tester.prepare_inputs()
    inputs.update(changes)
    return {name: value for name, value in inputs.items() if value is not None}


BAD_INPUTS = {
    "image/text batch mismatch": (
        lambda t: _bad_inputs(t, pixel_values=torch.randn(2, 3, 30, 30)),
        "pixel_values has batch size 2 but input_ids has batch size 3",
    ),
    "pixel size not matching the vision config": (
        lambda t: _bad_inputs(t, pixel_values=torch.randn(3, 3, 32, 32)),
        "pixel_values must have shape (batch, 3, 30, 30) to match the vision config, got (3, 3, 32, 32)",
    ),
    "pixel values of the wrong rank": (
        lambda t: _bad_inputs(t, pixel_values=torch.randn(3, 30, 30)),
        "pixel_values must have shape (batch, channels, height, width), got a tensor of shape (3, 30, 30)",
    ),
    "knowledge ids of the wrong rank": (
        lambda t: _bad_inputs(
            t,
            knowledge_input_ids=torch.ones(3, 5, dtype=torch.long),
            knowledge_attention_mask=torch.ones(3, 5, dtype=torch.long),
        ),
        "knowledge_input_ids must have shape (batch, num_knowledge, knowledge_length), got a tensor of shape (3, 5)",
    ),
    "knowledge mask of the wrong rank": (
        lambda t: _bad_inputs(t, knowledge_attention_mask=torch.ones(3, 15, dtype=torch.long)),
        "knowledge_attention_mask must have the shape of knowledge_input_ids (3, 3, 5), got (3, 15)",
    ),
    "knowledge ids without a mask": (
        lambda t: _bad_inputs(t, knowledge_attention_mask=None),
        "knowledge_input_ids was given without knowledge_attention_mask; pass the mask of shape (3, 3, 5)",
    ),
    "knowledge scores of the wrong shape": (
        lambda t: _bad_inputs(t, knowledge_scores=torch.rand(3, 2)),
        "knowledge_scores must have shape (batch, num_knowledge) = (3, 3), got (3, 2)",
    ),
    "knowledge batch mismatch": (
        lambda t: _bad_inputs(
            t,
            knowledge_input_ids=torch.ones(2, 3, 5, dtype=torch.long),
            knowledge_attention_mask=torch.ones(2, 3, 5, dtype=torch.long),
            knowledge_scores=None,
            knowledge_indices=None,
        ),
        "knowledge_input_ids has batch size 2 but the text batch is 3",
    ),
    "attention mask of another shape than the text": (
        lambda t: _bad_inputs(t, attention_mask=torch.ones(3, 6, dtype=torch.long)),
        "attention_mask must have the shape of input_ids (3, 7), got (3, 6)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument_and_shape(tester, case):
    model = _model(tester)
    make_inputs, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        model(**make_inputs(tester))


def test_bad_pretraining_targets_raise_value_error(tester):
    model = _pretraining_model(tester)
    inputs = tester.prepare_pretraining_inputs()
    with pytest.raises(ValueError, match=re.escape("knowledge_labels must have shape (batch, num_knowledge) = (3, 3)")):
        model(**{**inputs, "knowledge_labels": torch.ones(3, 2)})
    mlm_message = "mlm_labels need mlm_input_ids (the masked text) of the same shape"
    with pytest.raises(ValueError, match=re.escape(mlm_message)):
        model(**{**inputs, "mlm_input_ids": None})
    bad_triples = inputs["kg_triples"].clone()
    bad_triples[0, 0, 1] = tester.num_kg_relations
    with pytest.raises(ValueError, match=re.escape(f"but num_kg_relations={tester.num_kg_relations}")):
        model(**{**inputs, "kg_triples": bad_triples})


# --------------------------------------------------------------------------------------------------------------------
# Hub semantics: an exported folder loads as remote code without this repository
# --------------------------------------------------------------------------------------------------------------------

EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_reavl.ReavlConfig",
    "AutoModel": "modeling_reavl.ReavlModel",
    "AutoModelForPreTraining": "modeling_reavl.ReavlForPreTraining",
    "AutoModelForVisualQuestionAnswering": "modeling_reavl.ReavlForQuestionAnswering",
    "AutoModelForZeroShotImageClassification": "modeling_reavl.ReavlForImageTextRetrieval",
}


def test_isolated_interpreter_cannot_import_the_project(tmp_path):
    # The helper's own guarantee, without which the remote-code test below would prove nothing.
    project_root = str(Path(__file__).resolve().parents[1])
    result = run_isolated_json(
        """
        import importlib, sys
        outcome = {}
        for name in BLOCKED_PACKAGES + ("training.metrics", "json"):
            try:
                importlib.import_module(name)
                outcome[name] = "imported"
            except ImportError as error:
                outcome[name] = "blocked" if "blocked" in str(error) else str(error)
        outcome["project_on_path"] = any(entry.rstrip("/") == PROJECT_ROOT for entry in sys.path)
        emit(outcome)
        """.replace("PROJECT_ROOT", repr(project_root)),
        cwd=tmp_path,
        timeout=120,
    )
    assert result == {
        "modeling_reavl": "blocked",
        "processing": "blocked",
        "training": "blocked",
        "training.metrics": "blocked",
        "json": "imported",
        "project_on_path": False,
    }
    with pytest.raises(IsolatedRunError, match="ZeroDivisionError"):
        run_isolated("1 / 0", cwd=tmp_path, timeout=60)


def test_exported_folder_loads_as_remote_code_without_the_project(tester, tmp_path):
    model = _pretraining_model(tester).eval()
    _set_knowledge_gates(model.reavl, 0.7)
    export = tmp_path / "reavl-tiny"
    model.save_pretrained(export)

    saved = sorted(path.name for path in export.iterdir())
    assert {"config.json", "model.safetensors", "modeling_reavl.py", "configuration_reavl.py"} <= set(saved)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "reavl"
    # Every Auto class REAVL serves is mapped (so any of them loads the folder), and every entry names a class that
    # exists in the copied file.
    assert EXPECTED_AUTO_MAP.items() <= config["auto_map"].items()
    for auto_class, reference in config["auto_map"].items():
        module_name, class_name = reference.split(".")
        assert (export / f"{module_name}.py").exists(), auto_class
        assert re.search(rf"^class {class_name}\b", (export / f"{module_name}.py").read_text(), re.M), auto_class
    copied_source = (export / "modeling_reavl.py").read_text()
    assert "from .configuration_reavl import" in copied_source
    assert not re.search(r"^\s*(from|import)\s+(modeling_reavl|processing|training)\b", copied_source, re.M)

    inputs = tester.prepare_pretraining_inputs()
    save_file({name: value.contiguous() for name, value in inputs.items()}, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        expected_base = model.reavl(**{name: inputs[name] for name in tester.prepare_inputs()})
        expected = _forward_seeded(model, inputs)

    result = run_isolated_json(
        """
        import sys
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForPreTraining

        inputs = load_file("inputs.safetensors")
        base_inputs = {name: inputs[name] for name in inputs if name not in
                       ("knowledge_labels", "mlm_input_ids", "mlm_labels", "kg_triples")}
        base = AutoModel.from_pretrained("reavl-tiny", trust_remote_code=True).eval()
        pretraining = AutoModelForPreTraining.from_pretrained("reavl-tiny", trust_remote_code=True).eval()
        with torch.no_grad():
            base_outputs = base(**base_inputs)
            torch.manual_seed(0)
            pretraining_outputs = pretraining(**inputs)
        try:
            import modeling_reavl
            blocked = False
        except ImportError:
            blocked = True
        emit({
            "modeling_reavl_blocked": blocked,
            "classes": [type(base).__module__ + "." + type(base).__name__,
                        type(pretraining).__module__ + "." + type(pretraining).__name__],
            "project_imported": sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED_PACKAGES),
            "last_hidden_state": base_outputs.last_hidden_state.tolist(),
            "knowledge_gates": base_outputs.knowledge_gates.tolist(),
            "query_embeds": base_outputs.query_embeds.tolist(),
            "losses": {name: getattr(pretraining_outputs, name).item() for name in
                       ("loss", "itc_loss", "knowledge_alignment_loss", "mlm_loss", "itm_loss", "kg_loss",
                        "retriever_loss", "relevance_loss")},
        })
        """,
        cwd=tmp_path,
        timeout=180,
    )

    assert result["modeling_reavl_blocked"] and result["project_imported"] == []
    assert [name.rsplit(".", 1)[-1] for name in result["classes"]] == ["ReavlModel", "ReavlForPreTraining"]
    assert all(name.startswith("transformers_modules.") for name in result["classes"])
    for name in ("last_hidden_state", "knowledge_gates", "query_embeds"):
        torch.testing.assert_close(torch.tensor(result[name]), getattr(expected_base, name), atol=1e-5, rtol=0)
    for name, value in result["losses"].items():
        assert value == pytest.approx(getattr(expected, name).item(), abs=1e-5), name


# --------------------------------------------------------------------------------------------------------------------
# Pretrained towers: REAVL around real MiniLM weights
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_reavl(tmp_path_factory, tester):
    text_path = minilm_path()
    vision_path = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTModel(tester.get_vision_config()).save_pretrained(vision_path)
    model = ReavlModel.from_vision_text_pretrained(vision_path, text_path, num_fusion_layers=1).eval()
    return model, vision_path, text_path


def test_from_vision_text_pretrained_keeps_tower_weights_exactly(minilm_reavl):
    model, vision_path, text_path = minilm_reavl
    minilm_state = AutoModel.from_pretrained(text_path).state_dict()
    text_state = model.text_model.state_dict()
    assert len(text_state) > 90  # the whole encoder, embeddings to the last layer
    for name, tensor in text_state.items():
        assert torch.equal(tensor, minilm_state[name]), name
    vit_state = ViTModel.from_pretrained(vision_path).state_dict()
    for name, tensor in model.vision_model.state_dict().items():
        assert torch.equal(tensor, vit_state[name]), name
    assert model.config.text_config.hidden_size == 384
    assert model.config.fusion_num_attention_heads == 12 and model.config.fusion_intermediate_size == 1536


def test_from_vision_text_pretrained_initialises_reavl_heads(minilm_reavl):
    model, _, _ = minilm_reavl
    config = model.config
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name  # torch.empty left uninitialised would show here
    head = model.retrieval_head
    assert head.query_text_weight.shape == (256, 384)  # retrieval_dim = min(256, text hidden)
    assert torch.equal(head.query_text_weight, head.key_weight)
    assert 0 < head.query_image_weight.std().item() < 0.05  # small: the image half of the query is learnt
    torch.testing.assert_close(
        head.query_text_weight @ head.query_text_weight.t(), torch.eye(256), atol=1e-5, rtol=0
    )
    assert [layer.knowledge_gate.item() for layer in model.fusion_layers] == [config.knowledge_gate_init]
    assert model.relevance_gate.score_weight.item() == config.relevance_score_weight_init
    assert model.logit_scale.item() == pytest.approx(config.logit_scale_init_value)
    fusion_weight = model.fusion_layers[0].self_attention.q_proj.weight
    assert abs(fusion_weight.std().item() - config.initializer_range) < 0.002
    assert torch.count_nonzero(model.fusion_layers[0].self_attention.q_proj.bias) == 0
    assert torch.equal(model.fusion_norm.weight, torch.ones(384))


def test_minilm_paraphrase_retrieval_survives(minilm_reavl):
    model, _, text_path = minilm_reavl
    tokenizer = AutoTokenizer.from_pretrained(text_path)
    sentences = [
        "A man is playing a guitar on stage.",
        "Someone performs a song on the guitar in front of an audience.",
        "The central bank raised interest rates by half a percent.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        queries = model.get_query_embeddings(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        keys = model.get_knowledge_features(batch["input_ids"], batch["attention_mask"])
    similarity = queries @ keys.t()
    # Each paraphrase retrieves the other ahead of the unrelated sentence, by a clear margin.
    assert similarity[0, 1] > similarity[0, 2] + 0.2, similarity
    assert similarity[1, 0] > similarity[1, 2] + 0.2, similarity
    torch.testing.assert_close(similarity.diagonal(), torch.ones(3), atol=1e-5, rtol=0)
