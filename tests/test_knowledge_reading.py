"""How REAVL learns to find and read knowledge: index-wide alignment negatives, extra augmented views, learned
attention pooling of entries, and the VQA head's copy-from-knowledge score.

These are the parts that let a model answer for entities it was never fine-tuned on (the demo's held-out countries):
retrieval must separate hundreds of look-alike entries from an image alone, and the answer must be read from the
retrieved entry rather than recalled by a classifier. Tiny configs from `ReavlModelTester`; CPU, seconds.
"""

import math

import pytest
import torch

from modeling_reavl import ReavlConfig, ReavlForPreTraining, ReavlForQuestionAnswering, ReavlModel
from tests.test_modeling_reavl import ReavlModelTester
from training.data import KnowledgeBatchBuilder


@pytest.fixture(scope="module")
def tester():
    return ReavlModelTester()


def _pretraining(tester, **overrides):
    torch.manual_seed(0)
    return ReavlForPreTraining(tester.get_config(**overrides)).eval()


def _alignment_loss(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, **extra, compute_itm=False).knowledge_alignment_loss


# --------------------------------------------------------------------------------------------------------------------
# Pre-training: index-wide negatives and extra views
# --------------------------------------------------------------------------------------------------------------------


def test_index_negatives_make_the_alignment_harder_and_skip_rows_already_in_the_batch(tester):
    model = _pretraining(tester)
    inputs = tester.prepare_pretraining_inputs()
    plain = _alignment_loss(model, inputs)
    generator = torch.Generator().manual_seed(1)
    cached = torch.nn.functional.normalize(torch.randn(20, tester.retrieval_dim, generator=generator), dim=-1)
    rows = torch.arange(100, 120)  # rows that no example of the batch retrieved
    harder = _alignment_loss(model, inputs, negative_keys=cached, negative_key_indices=rows)
    # More candidates in the softmax denominator, same positives: the loss can only grow.
    assert harder > plain + 1e-4
    # Cached copies of rows the batch retrieved are not counted twice: they compete through their fresh keys.
    in_batch_rows = inputs["knowledge_indices"].reshape(-1)[:5]
    same = _alignment_loss(model, inputs, negative_keys=cached[:5], negative_key_indices=in_batch_rows)
    torch.testing.assert_close(same, plain)


def test_extra_views_train_the_vision_tower_through_the_image_only_query(tester):
    model = _pretraining(tester).train()
    inputs = tester.prepare_pretraining_inputs()
    views = torch.randn(tester.batch_size, 2, tester.num_channels, tester.image_size, tester.image_size)
    outputs = model(**inputs, view_pixel_values=views, compute_itm=False)
    assert torch.isfinite(outputs.knowledge_alignment_loss)
    outputs.knowledge_alignment_loss.backward()
    assert model.reavl.retrieval_head.query_image_weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="view_pixel_values"):
        model(**inputs, view_pixel_values=views[:2])


def test_negative_keys_of_the_wrong_width_are_refused(tester):
    model = _pretraining(tester)
    with pytest.raises(ValueError, match="negative_keys"):
        model(**tester.prepare_pretraining_inputs(), negative_keys=torch.zeros(4, tester.retrieval_dim + 1))


def test_batch_builder_samples_index_negatives_reproducibly(tester):
    from transformers import BertTokenizerFast

    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(vocabulary)})
    batch = {
        "pixel_values": torch.zeros(2, 3, 4, 4),
        "input_ids": torch.tensor([[2, 5, 3], [2, 6, 3]]),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "entity_token_mask": torch.zeros(2, 3, dtype=torch.bool),
        "positive_rows": torch.tensor([[0], [1]]),
    }
    from processing import ReavlRetriever

    embeddings = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    queries = embeddings[:2] * 2
    retriever = ReavlRetriever.from_embeddings(
        ids=[f"E{row}" for row in range(30)], titles=[f"entry {row}" for row in range(30)],
        input_ids=[[2, 5, 6, 3]] * 30, embeddings=embeddings.numpy(),
    )
    every = KnowledgeBatchBuilder(retriever, 2, tokenizer, 0.15, index_negatives=-1)
    every.set_index_embeddings(embeddings)
    inputs, _ = every(batch, queries, mask_seed=3)
    assert torch.equal(inputs["negative_key_indices"], torch.arange(30))
    torch.testing.assert_close(inputs["negative_keys"], embeddings)

    sampled = KnowledgeBatchBuilder(retriever, 2, tokenizer, 0.15, index_negatives=10)
    sampled.set_index_embeddings(embeddings)
    first, _ = sampled(batch, queries, mask_seed=3)
    again, _ = sampled(batch, queries, mask_seed=3)
    assert first["negative_key_indices"].shape == (10,)
    assert len(set(first["negative_key_indices"].tolist())) == 10
    assert torch.equal(first["negative_key_indices"], again["negative_key_indices"])  # exact resume

    none = KnowledgeBatchBuilder(retriever, 2, tokenizer, 0.15)
    none.set_index_embeddings(embeddings)
    assert "negative_keys" not in none(batch, queries, mask_seed=3)[0]


# --------------------------------------------------------------------------------------------------------------------
# Attention pooling of knowledge entries
# --------------------------------------------------------------------------------------------------------------------


def test_attention_pooling_starts_as_mean_pooling_and_can_focus_on_one_token(tester):
    torch.manual_seed(0)
    mean_model = ReavlModel(tester.get_config()).eval()
    torch.manual_seed(0)
    attention_model = ReavlModel(tester.get_config(knowledge_pooling="attention")).eval()
    attention_model.load_state_dict(mean_model.state_dict(), strict=False)
    inputs = tester.prepare_inputs()
    ids = inputs["knowledge_input_ids"][:, 0]
    mask = inputs["knowledge_attention_mask"][:, -1]  # padded entries: pooling must ignore padding
    with torch.no_grad():
        torch.testing.assert_close(
            attention_model.get_knowledge_features(ids, mask), mean_model.get_knowledge_features(ids, mask)
        )
        states, _ = attention_model.encode_knowledge(ids, mask)
        # A scorer that only looks at one direction of the states puts (almost) all weight on the top token.
        scorer = attention_model.knowledge_pool_scorer
        scorer.weight.copy_(1e4 * states[0, 0] / states[0, 0].norm())
        _, pooled = attention_model.encode_knowledge(ids, mask)
        torch.testing.assert_close(pooled[0], states[0, 0], atol=1e-3, rtol=1e-3)
    # The scorer determines the keys, so it is part of the index fingerprint.
    before = attention_model.knowledge_encoder_fingerprint()
    with torch.no_grad():
        scorer.bias.add_(1.0)
        scorer.weight.mul_(0.5)
    assert attention_model.knowledge_encoder_fingerprint() != before


def test_unknown_knowledge_pooling_is_refused(tester):
    with pytest.raises(ValueError, match="knowledge_pooling"):
        tester.get_config(knowledge_pooling="max")


# --------------------------------------------------------------------------------------------------------------------
# VQA: copying the answer from a retrieved entry
# --------------------------------------------------------------------------------------------------------------------

# Answer 0 is two tokens (like "north sea"), answer 1 one token, answer 2 never occurs in the entries.
ANSWERS = [[10, 11], [12], [13]]


def _qa_model(tester, **overrides):
    torch.manual_seed(0)
    config = tester.get_config(num_labels=3, answer_token_ids=ANSWERS, **overrides)
    return ReavlForQuestionAnswering(config).eval()


def _entries(tester):
    inputs = tester.prepare_inputs()
    ids = inputs["knowledge_input_ids"].clamp(min=20, max=tester.vocab_size - 1)
    mask = inputs["knowledge_attention_mask"]
    ids[mask == 0] = 0
    ids[:, 0, 1:3] = torch.tensor([10, 11])  # entry 0 states answer 0 ...
    ids[:, 0, 4] = 10  # ... and a lone first token of answer 0, which is not answer 0
    ids[:, 1, 2] = 12  # entry 1 states answer 1
    inputs["knowledge_input_ids"] = ids
    return inputs


def test_answer_occurrences_match_whole_token_sequences(tester):
    model = _qa_model(tester)
    occurrences = model.answer_occurrences(_entries(tester)["knowledge_input_ids"])
    assert occurrences.shape == (tester.batch_size, tester.num_knowledge, tester.knowledge_length, 3)
    assert occurrences[:, 0, 1, 0].eq(1).all() and occurrences[:, 0, :, 0].sum(-1).eq(1).all()
    assert occurrences[:, 1, 2, 1].eq(1).all() and occurrences[..., 1].sum((-1, -2)).eq(1).all()
    assert occurrences[..., 2].sum() == 0


def test_copy_score_is_the_retrieval_posterior_times_the_pointer_mass(tester):
    model = _qa_model(tester)
    with torch.no_grad():  # a uniform pointer within each entry and gates that add nothing to the entry posterior
        for module in (model.copy_query, model.reavl.relevance_gate.query_projection,
                       model.reavl.relevance_gate.entry_projection):
            module.weight.zero_()
            module.bias.zero_()
        model.reavl.relevance_gate.score_weight.zero_()
    inputs = _entries(tester)
    parts = model.reavl.run_parts(**inputs)
    copied = model.copy_scores(
        parts["fused"][:, 0], parts["knowledge"], inputs["knowledge_input_ids"], inputs["knowledge_attention_mask"]
    )
    prior = (inputs["knowledge_scores"] / model.config.retrieval_temperature).softmax(-1)
    lengths = inputs["knowledge_attention_mask"].sum(-1).float()
    torch.testing.assert_close(copied[:, 0], prior[:, 0] / lengths[:, 0])
    torch.testing.assert_close(copied[:, 1], prior[:, 1] / lengths[:, 1])
    assert copied[:, 2].abs().max() == 0
    # The copy score enters the logits with its learned weight; without knowledge only the classifier speaks.
    with torch.no_grad():
        full = model(**inputs).logits
        plain = model.vqa_head(parts["fused"][:, 0])
        torch.testing.assert_close(full, plain + model.copy_weight * copied)
        no_knowledge = model(**inputs, use_knowledge=False).logits
        parts_without = model.reavl.run_parts(**inputs, use_knowledge=False)
        torch.testing.assert_close(no_knowledge, model.vqa_head(parts_without["fused"][:, 0]))


def test_copying_learns_to_answer_from_the_entry_of_an_unseen_answer_pattern(tester):
    """A question type -> attribute pointer is learnt in a few steps and transfers to entries never trained on."""
    model = _qa_model(tester, knowledge_gate_init=0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    def batch(size):
        inputs = tester.prepare_inputs(batch_size=size, seed=int(torch.randint(0, 10**6, (1,), generator=generator)))
        ids = inputs["knowledge_input_ids"].clamp(min=20)
        ids[inputs["knowledge_attention_mask"] == 0] = 0
        answer = torch.randint(0, 2, (size,), generator=generator)
        position = torch.randint(0, 3, (size,), generator=generator)
        for row in range(size):  # the answer sits somewhere in the top-scored entry
            tokens = ANSWERS[int(answer[row])]
            ids[row, 0, position[row] : position[row] + len(tokens)] = torch.tensor(tokens)
        inputs["knowledge_input_ids"] = ids
        inputs["knowledge_scores"] = torch.tensor([[0.9, 0.1, 0.1]]).repeat(size, 1)
        labels = torch.nn.functional.one_hot(answer, 3).float()
        return inputs, labels

    for _ in range(40):
        inputs, labels = batch(8)
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    inputs, labels = batch(64)
    with torch.no_grad():
        accuracy = (model(**inputs).logits.argmax(-1) == labels.argmax(-1)).float().mean().item()
        ablation = (model(**inputs, use_knowledge=False).logits.argmax(-1) == labels.argmax(-1)).float().mean()
    assert accuracy > 0.95, accuracy
    assert ablation < 0.8, ablation  # random images and texts carry no answer: only the entry does


def test_answer_token_ids_must_cover_every_label(tester):
    with pytest.raises(ValueError, match="answer_token_ids"):
        ReavlForQuestionAnswering(tester.get_config(num_labels=2, answer_token_ids=ANSWERS))
    with pytest.raises(ValueError, match="answer_token_ids"):
        tester.get_config(num_labels=3, answer_token_ids=[[1], [], [2]])


def test_copy_head_survives_save_and_load(tester, tmp_path):
    model = _qa_model(tester)
    with torch.no_grad():
        model.copy_weight.fill_(7.5)
    model.save_pretrained(tmp_path)
    reloaded = ReavlForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert reloaded.config.answer_token_ids == ANSWERS
    inputs = _entries(tester)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


# --------------------------------------------------------------------------------------------------------------------
# Entity linking: what the no-knowledge ablation leaves out
# --------------------------------------------------------------------------------------------------------------------


def test_entity_linking_ablation_scores_candidates_without_the_retrieval_score(tester):
    from modeling_reavl import ReavlForEntityLinking

    torch.manual_seed(0)
    model = ReavlForEntityLinking(tester.get_config()).eval()
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        model.reavl.retrieval_head.query_image_weight.mul_(50.0)  # make the retrieval logits matter
        torch.nn.init.normal_(model.mention_projection.weight)  # a trained head has a similarity of its own
        full = model(**inputs).logits
        ablation = model(**inputs, use_knowledge=False).logits
        # The retrieval logits come from the query and the entries' keys, so changing the query's image part moves
        # the full model's scores and leaves the ablation's alone.
        model.reavl.retrieval_head.query_image_weight.mul_(-1.0)
        assert not torch.allclose(model(**inputs).logits, full)
        torch.testing.assert_close(model(**inputs, use_knowledge=False).logits, ablation)


def test_untrained_entity_linking_head_ranks_exactly_as_the_retriever(tester):
    from modeling_reavl import ReavlForEntityLinking

    torch.manual_seed(0)
    model = ReavlForEntityLinking(tester.get_config()).eval()
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        model.reavl.retrieval_head.query_image_weight.mul_(50.0)
        logits = model(**inputs).logits
        retrieval = model.reavl(**inputs).retrieval_logits
    torch.testing.assert_close(logits, retrieval / model.config.entity_linking_temperature)
    with torch.no_grad():
        torch.nn.init.normal_(model.mention_projection.weight)  # once learnt, the head's own similarity joins in
        assert not torch.allclose(model(**inputs).logits, logits)
