"""Pre-training data: loading image-text pairs, weak linking, holdout split, collation, entity-span masking,
weak-positive forcing and KG triples (training/data.py).

Also home of the tiny synthetic world (coloured shapes named after fictional entities, and a KB about them) that
tests/test_pretrain.py trains on.
"""

import csv
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from processing.knowledge_base import load_knowledge_base
from processing.mention_linker import MentionLinker
from tests.conftest import minilm_path
from training.data import (
    KnowledgeBatchBuilder,
    KnowledgeGraph,
    PretrainingCollator,
    build_relation_vocabulary,
    entity_token_mask,
    force_weak_positives,
    load_image_text_pairs,
    mask_tokens_for_mlm,
    prepare_pretraining_pairs,
    split_by_image,
    weak_positive_recall,
)


# --------------------------------------------------------------------------------------------------------------------
# A tiny synthetic world: 8 entities, each a coloured shape; captions name them; the KB describes them and relates
# them; 8 distractor entries nobody mentions.
# --------------------------------------------------------------------------------------------------------------------

ENTITIES = [
    ("Zorblat", (220, 40, 40), "circle", "red"),
    ("Quenmir", (40, 180, 60), "square", "green"),
    ("Dravok", (40, 70, 220), "triangle", "blue"),
    ("Pellion", (230, 200, 40), "circle", "yellow"),
    ("Vashtor", (160, 60, 200), "square", "purple"),
    ("Morquel", (40, 200, 200), "triangle", "cyan"),
    ("Tandrel", (240, 130, 30), "square", "orange"),
    ("Krisolo", (120, 120, 120), "circle", "grey"),
]
DISTRACTORS = ["Harbin River", "Olvek Plain", "Siran Hills", "Tobruk Gate", "Wessel Lake", "Ardent Bay",
               "Colm Ridge", "Nerra Vale"]
# Each image of an entity has its own background, named in its captions, so no two images share a caption (ITC and
# ITM need the pairing to be learnable, not just the entity).
BACKGROUNDS = [("navy", (20, 20, 100)), ("olive", (100, 100, 20)), ("white", (235, 235, 235))]
CAPTION_TEMPLATES = ["a photo of {name} on a {background} background", "{name} in front of {background}"]


def draw_shape(colour, shape, seed: int, background=(0, 0, 0), size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    margin = int(rng.integers(4, 12))
    box = (margin, margin, size - margin + int(rng.integers(-3, 3)), size - margin + int(rng.integers(-3, 3)))
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
    return image


def knowledge_records() -> list[dict]:
    records = []
    for index, (name, _, shape, colour_name) in enumerate(ENTITIES):
        records.append({
            "id": f"E{index}",
            "title": name,
            "text": f"{name} is a {colour_name} {shape} that lives in the valley.",
            "aliases": [],
            "triples": [["neighbour of", f"E{(index + 1) % len(ENTITIES)}"], ["rival of", f"E{(index + 3) % len(ENTITIES)}"]],
        })
    for index, title in enumerate(DISTRACTORS):
        records.append({"id": f"D{index}", "title": title, "text": f"{title} is a place far from everything.",
                        "aliases": [], "triples": [["located in", f"D{(index + 1) % len(DISTRACTORS)}"]]})
    # Namesakes: places that repeat an entity's name more often than its own entry does, so that at the start a
    # caption naming the entity retrieves them as readily; the retriever has to learn which entry is meant.
    for index, (name, *_) in enumerate(ENTITIES):
        for kind in ("Lake", "Road"):
            records.append({
                "id": f"N{index}{kind[0]}", "title": f"{name} {kind}",
                "text": f"The {name} {kind.lower()} was named by {name} people after {name} of old.",
                "aliases": [], "triples": [],
            })
    return records


def write_world(root: Path, images_per_entity: int = 3, subfolder: str = "images") -> dict:
    """Write images/, captions.csv (image paths relative to images/) and kb.jsonl under `root`."""
    image_dir = root / subfolder
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for entity_index, (name, colour, shape, _) in enumerate(ENTITIES):
        for copy in range(images_per_entity):
            file_name = f"{name.lower()}_{copy}.png"
            background_name, background = BACKGROUNDS[copy % len(BACKGROUNDS)]
            draw_shape(colour, shape, entity_index * 100 + copy, background).save(image_dir / file_name)
            for template in CAPTION_TEMPLATES:
                rows.append({"image": file_name, "caption": template.format(name=name, background=background_name)})
    with (root / "captions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    with (root / "kb.jsonl").open("w") as handle:
        for record in knowledge_records():
            handle.write(json.dumps(record) + "\n")
    return {"captions": root / "captions.csv", "knowledge": root / "kb.jsonl", "images": image_dir, "rows": rows}


@pytest.fixture()
def world(tmp_path):
    return write_world(tmp_path)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def _image_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 30, "width": 30}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def test_csv_with_images_subfolder_resolves_paths(world):
    pairs = load_image_text_pairs(world["captions"])
    assert len(pairs) == len(world["rows"]) == 48
    assert pairs.column_names == ["image", "caption", "image_key"]
    first = pairs.with_format("arrow")["image"].to_pylist()[0]
    assert Path(first["path"]).exists() and Path(first["path"]).parent == world["images"]
    assert len(set(pairs["image_key"])) == 24


def test_jsonl_imagefolder_and_dataset_sources_agree(world, tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"file": f"images/{row['image']}", "text": row["caption"]}) + "\n"
                             for row in world["rows"]))
    from_jsonl = load_image_text_pairs(jsonl, image_column="file", caption_column="text")

    folder = world["images"]
    with (folder / "metadata.csv").open("w", newline="") as handle:  # imagefolder convention: file_name column
        writer = csv.DictWriter(handle, fieldnames=["file_name", "caption"])
        writer.writeheader()
        writer.writerows({"file_name": row["image"], "caption": row["caption"]} for row in world["rows"])
    from_folder = load_image_text_pairs(folder)

    in_memory = datasets.Dataset.from_dict(
        {"img": [str(world["images"] / row["image"]) for row in world["rows"]],
         "text": [row["caption"] for row in world["rows"]]}
    ).cast_column("img", datasets.Image())
    saved = tmp_path / "saved"
    in_memory.save_to_disk(str(saved))
    from_saved = load_image_text_pairs(str(saved), image_column="img", caption_column="text")

    for pairs in (from_jsonl, from_folder, from_saved):
        assert pairs["caption"] == from_jsonl["caption"]
        assert len(set(pairs["image_key"])) == 24
    prepared, stats = prepare_pretraining_pairs(from_saved)
    assert stats.unreadable_images == 0 and len(prepared) == 48


def test_missing_caption_column_names_existing_columns(world):
    with pytest.raises(ValueError) as error:
        load_image_text_pairs(world["captions"], caption_column="sentence")
    message = str(error.value)
    assert "'sentence'" in message and "['image', 'caption']" in message
    dataset = datasets.Dataset.from_dict({"picture": ["a.png"], "txt": ["hello"]})
    with pytest.raises(ValueError, match=r"columns that exist are \['picture', 'txt'\]"):
        load_image_text_pairs(dataset, image_column="picture")


def test_unreadable_images_are_skipped_and_counted_in_the_log(world, caplog):
    (world["images"] / "zorblat_0.png").write_bytes(b"this is not a png")  # corrupt
    (world["images"] / "quenmir_1.png").unlink()  # missing
    data = Image.open(world["images"] / "dravok_2.png")
    truncated = world["images"] / "dravok_2.png"
    data.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])  # truncated
    pairs = load_image_text_pairs(world["captions"])
    with caplog.at_level(logging.WARNING, logger="training.data"):
        prepared, stats = prepare_pretraining_pairs(pairs)
    assert stats.unreadable_images == 3 and stats.unreadable_rows == 6
    assert len(prepared) == 42
    assert "skipped 3 unreadable image(s) (6 caption row(s))" in caplog.text
    assert "zorblat_0.png" in caplog.text


def test_weak_linking_gives_rows_and_spans(world):
    knowledge_base = load_knowledge_base(world["knowledge"])
    pairs = load_image_text_pairs(world["captions"])
    prepared, stats = prepare_pretraining_pairs(pairs, MentionLinker.from_knowledge_base(knowledge_base))
    assert stats.linked_rows == 48 and stats.linked_entities == 8
    row = prepared[0]
    assert row["caption"] == "a photo of Zorblat on a navy background"
    assert row["positive_rows"] == [0]
    start, end = row["mention_spans"][0]
    assert row["caption"][start:end] == "Zorblat"


def test_holdout_split_is_by_image_and_deterministic(world):
    pairs, _ = prepare_pretraining_pairs(load_image_text_pairs(world["captions"]), check_images=False)
    train, holdout = split_by_image(pairs, holdout_images=5, seed=3)
    assert len(set(holdout["image_key"])) == 5 and len(holdout) == 10
    assert not set(train["image_key"]) & set(holdout["image_key"])
    again_train, again_holdout = split_by_image(pairs.shuffle(seed=1), holdout_images=5, seed=3)
    assert set(again_holdout["image_key"]) == set(holdout["image_key"])
    assert set(split_by_image(pairs, 5, seed=4)[1]["image_key"]) != set(holdout["image_key"])
    with pytest.raises(ValueError, match="24 distinct images"):
        split_by_image(pairs, holdout_images=24)


# --------------------------------------------------------------------------------------------------------------------
# Collation and masking
# --------------------------------------------------------------------------------------------------------------------


def test_collator_marks_mention_tokens(world, tokenizer):
    knowledge_base = load_knowledge_base(world["knowledge"])
    prepared, _ = prepare_pretraining_pairs(
        load_image_text_pairs(world["captions"]), MentionLinker.from_knowledge_base(knowledge_base)
    )
    collator = PretrainingCollator(_image_processor(), tokenizer, max_length=32)
    batch = collator([prepared[index] for index in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 30, 30)
    assert batch["positive_rows"].tolist() == [[0], [0], [0], [0]]
    for row in range(4):
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][row][batch["entity_token_mask"][row]])
        assert tokenizer.convert_tokens_to_string(tokens).replace(" ", "") == "zorblat"


def test_entity_token_mask_ignores_special_tokens():
    offsets = torch.tensor([[[0, 0], [0, 3], [4, 9], [9, 12], [0, 0]]])
    assert entity_token_mask(offsets, [[[4, 12]]]).tolist() == [[False, False, True, True, False]]
    assert entity_token_mask(offsets, [[]]).sum() == 0


def test_mlm_masks_mentions_first_then_random_with_80_10_10():
    generator = torch.Generator().manual_seed(0)
    batch, length = 4000, 22
    input_ids = torch.randint(1000, 2000, (batch, length))
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    attention_mask = torch.ones_like(input_ids)
    entity_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    entity_mask[:, 3:5] = True  # a two-token mention; 20 maskable tokens at 15% -> budget 3
    masked, labels = mask_tokens_for_mlm(
        input_ids, attention_mask, entity_mask, [0, 101, 102, 103], 103, 30522, 0.15, generator
    )
    chosen = labels != -100
    assert (chosen.sum(dim=1) == 3).all()
    assert chosen[:, 3:5].all(), "mention tokens are masked first"
    assert not chosen[:, 0].any() and not chosen[:, -1].any(), "special tokens are never masked"
    assert (labels[chosen] == input_ids[chosen]).all()
    share_mask = (masked[chosen] == 103).float().mean().item()
    share_kept = (masked[chosen] == input_ids[chosen]).float().mean().item()
    assert abs(share_mask - 0.8) < 0.02 and abs(share_kept - 0.1) < 0.02, (share_mask, share_kept)
    # A mention longer than the budget: a subset of it, nothing else.
    entity_mask[:, 2:12] = True
    _, labels = mask_tokens_for_mlm(input_ids, attention_mask, entity_mask, [101, 102], 103, 30522, 0.15,
                                    torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert (chosen.sum(dim=1) == 3).all() and chosen[:, 2:12].sum() == 3 * batch


def test_mlm_masking_is_reproducible_from_its_seed():
    input_ids = torch.randint(1000, 2000, (8, 16))
    attention_mask = torch.ones_like(input_ids)
    runs = [
        mask_tokens_for_mlm(input_ids, attention_mask, None, [], 103, 30522, 0.15, torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# --------------------------------------------------------------------------------------------------------------------
# Weak positives, retrieval statistics, KG triples
# --------------------------------------------------------------------------------------------------------------------


def test_force_weak_positives_replaces_lowest_scored_slots():
    indices = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4], [9, 10, 11, 12]])
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.9, 0.8, 0.7, 0.6], [0.4, 0.3, 0.2, 0.1]])
    positives = torch.tensor([[7, 20, 21], [2, -1, -1], [-1, -1, -1]])
    new_indices, labels, forced = force_weak_positives(indices, scores, positives)
    # Row 0: 7 is present and stays; 20 and 21 take the two lowest-scored other slots (scores 0.1 and 0.3).
    assert new_indices[0].tolist() == [5, 20, 7, 21]
    assert labels[0].tolist() == [0, 1, 1, 1]
    assert new_indices[1].tolist() == [1, 2, 3, 4] and labels[1].tolist() == [0, 1, 0, 0]
    assert new_indices[2].tolist() == [9, 10, 11, 12] and labels[2].sum() == 0
    assert forced == 2
    # More positives than K: the first K are kept.
    new_indices, labels, _ = force_weak_positives(torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.4]]),
                                                  torch.tensor([[7, 8, 9]]))
    assert new_indices.tolist() == [[8, 7]] and labels.tolist() == [[1, 1]]


def test_weak_positive_recall():
    retrieved = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2, 3]])
    positives = torch.tensor([[2, 9], [4, -1], [1, -1], [-1, -1]])
    total, count = weak_positive_recall(retrieved, positives)
    assert count == 3 and total == pytest.approx(0.5 + 1.0 + 0.0)


def test_relation_vocabulary_is_capped_by_frequency(world):
    knowledge_base = load_knowledge_base(world["knowledge"])
    assert build_relation_vocabulary(knowledge_base, 2) == ["located in", "neighbour of"]  # 8, 8, 8: ties by name
    graph = KnowledgeGraph(knowledge_base, max_relations=2)
    assert graph.relations == ["located in", "neighbour of"]
    assert len(graph) == 16 and graph.dropped == 8  # "rival of" is outside the vocabulary


def test_kg_triples_link_entries_of_the_batch(world):
    knowledge_base = load_knowledge_base(world["knowledge"])
    graph = KnowledgeGraph(knowledge_base)  # relations: located in, neighbour of, rival of
    assert graph.relations == ["located in", "neighbour of", "rival of"]
    # Example 0 retrieved E0, E5, D0, D7; example 1 retrieved E1, E3, D1, D2 (rows: E* = 0..7, D* = 8..15).
    indices = torch.tensor([[0, 5, 8, 15], [1, 3, 9, 10]])
    triples = graph.batch_triples(indices)
    rows = {tuple(row) for row in triples[0].tolist() if row[0] >= 0}
    # E0 neighbour of E1 (example 1, slot 4); E0 rival of E3 (slot 5); E5 neighbour of E6 (absent); E5 rival of E0
    # (own slot 0); D0 located in D1 (slot 6); D7 located in D0 (own slot 2).
    assert rows == {(0, 1, 4), (0, 2, 5), (1, 2, 0), (2, 0, 6), (3, 0, 2)}
    # Example 1: only D1 located in D2 (own slot 7); E1 and E3's neighbours and rivals are not in the batch.
    assert [row for row in triples[1].tolist() if row[0] >= 0] == [[2, 0, 7]]
    assert graph.batch_triples(torch.tensor([[2, 4]])) is None  # E2 and E4 relate to nothing retrieved


class _ArrayRetriever:
    """A stand-in with the retriever's batched interface over a fixed embedding matrix (exact inner product)."""

    def __init__(self, embeddings, token_ids):
        self.embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        self.token_ids = token_ids  # (N, L)

    def retrieve(self, queries, k):
        scores = torch.as_tensor(queries) @ self.embeddings.t()
        top = scores.topk(k, dim=1)
        ids, mask = self.get_entries(top.indices.numpy())
        return {"knowledge_indices": top.indices.numpy(), "knowledge_scores": top.values.numpy(),
                "knowledge_input_ids": ids, "knowledge_attention_mask": mask}

    def get_entries(self, indices):
        ids = self.token_ids[np.asarray(indices)]
        return ids, (ids > 0).astype(np.int64)


def test_batch_builder_forces_positives_and_scores_them_with_the_index(tokenizer):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(10, 6)).astype(np.float32)
    token_ids = np.arange(1, 10 * 5 + 1).reshape(10, 5)
    retriever = _ArrayRetriever(embeddings, token_ids)
    builder = KnowledgeBatchBuilder(retriever, 3, tokenizer, 0.15, knowledge_graph=None)
    builder.set_index_embeddings(embeddings)
    queries = torch.as_tensor(embeddings[[0, 1]] * 5)  # each query finds its own row first
    plain_top = (queries @ torch.as_tensor(embeddings).t()).topk(3).indices
    outside = [row for row in range(10) if row not in plain_top[0].tolist()][0]
    batch = {
        "pixel_values": torch.zeros(2, 3, 30, 30),
        "input_ids": torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "entity_token_mask": torch.zeros(2, 4, dtype=torch.bool),
        "positive_rows": torch.tensor([[0, outside], [-1, -1]]),
    }
    inputs, stats = builder(batch, queries, mask_seed=0)
    assert stats["recall_count"] == 1 and stats["recall_sum"] == pytest.approx(0.5)
    assert stats["forced"] == 1
    assert outside in inputs["knowledge_indices"][0].tolist() and 0 in inputs["knowledge_indices"][0].tolist()
    assert inputs["knowledge_labels"][0].sum() == 2 and inputs["knowledge_labels"][1].sum() == 0
    expected_scores = torch.einsum("br,bkr->bk", queries, torch.as_tensor(embeddings)[inputs["knowledge_indices"]])
    assert torch.allclose(inputs["knowledge_scores"], expected_scores)
    assert np.array_equal(inputs["knowledge_input_ids"].numpy(), token_ids[inputs["knowledge_indices"].numpy()])
    assert inputs["mlm_labels"].shape == (2, 4) and (inputs["mlm_labels"] != -100).any()
