"""Knowledge index and retriever (issue 3): building, searching, saving, loading and matching a model.

The tests read as examples. The fast ones use a tiny REAVL model (hidden 32, 2 layers, 30 px images with 2 px
patches) over a 128-token WordPiece vocabulary written to a temporary folder, and random unit vectors where only the
search matters. The helpers at the top (`tiny_tokenizer`, `tiny_model`, `tiny_processor`, `TINY_KB`) are shared with
`tests/test_processing.py`.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertTokenizer, ViTConfig, ViTImageProcessor

from modeling_reavl import ReavlConfig, ReavlForPreTraining, ReavlModel
from processing import (
    KnowledgeBaseError,
    KnowledgeIndexError,
    ReavlProcessor,
    ReavlRetriever,
    build_knowledge_index,
    embed_knowledge_entries,
    entry_to_text,
)
from processing import retrieval_reavl
from processing.retrieval_reavl import resolve_index_factory


# --------------------------------------------------------------------------------------------------------------------
# tiny world shared with test_processing.py
# --------------------------------------------------------------------------------------------------------------------

TINY_WORDS = (
    "the a of is in and by on city river tower france paris capital famous built iron long flows through country "
    "europe seine eiffel mountain alps highest peak lake geneva switzerland bridge old"
).split()

TINY_KB = [
    {"id": "Q90", "title": "Paris", "text": "the capital of france", "aliases": ["city of light"],
     "triples": [["capital of", "Q142"]]},
    {"id": "Q1471", "title": "Seine", "text": "a long river that flows through paris and the north of france",
     "triples": [["flows through", "Q90"], ["country", "Q142"]]},
    {"id": "Q243", "title": "Eiffel Tower", "text": "iron tower in paris", "triples": [["located in", "Q90"]]},
    {"id": "Q142", "title": "France", "text": "a country in europe"},
    {"id": "Q583", "title": "Mont Blanc", "text": "the highest peak of the alps",
     "triples": [["country", "Q142"], ["country", "Q39"]]},
    {"id": "Q39", "title": "Switzerland", "text": "a country in europe with the alps"},
    {"id": "Q6403", "title": "Lake Geneva", "text": "a lake in switzerland and france on the old river",
     "triples": [["country", "Q39"]]},
    {"id": "Q7", "title": "Pont Neuf", "text": "the old bridge on the seine in paris"},
]


def write_tiny_vocab(folder: Path) -> Path:
    """A WordPiece vocab.txt: special tokens, characters, `##` characters and the words of `TINY_KB`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *string.digits,
              *string.ascii_lowercase, *(f"##{c}" for c in string.ascii_lowercase + string.digits), *TINY_WORDS]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return path


def tiny_tokenizer(folder: Path) -> BertTokenizer:
    write_tiny_vocab(folder)
    return BertTokenizer.from_pretrained(folder)


def tiny_config(vocab_size: int, **overrides) -> ReavlConfig:
    kwargs = dict(
        vision_config=ViTConfig(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37).to_dict(),
        text_config={"model_type": "bert", "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 64},
        projection_dim=16, retrieval_dim=16, num_knowledge=3, max_knowledge_length=12, num_fusion_layers=1,
        fusion_num_attention_heads=4, fusion_intermediate_size=37,
    )
    kwargs.update(overrides)
    return ReavlConfig(**kwargs)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> ReavlModel:
    torch.manual_seed(seed)
    return ReavlModel(tiny_config(vocab_size, **overrides)).eval()


def tiny_processor(tokenizer, **kwargs) -> ReavlProcessor:
    image_processor = ViTImageProcessor(size={"height": 30, "width": 30}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    kwargs.setdefault("num_knowledge", 3)
    kwargs.setdefault("max_knowledge_length", 12)
    return ReavlProcessor(image_processor, tokenizer, **kwargs)


def random_unit_vectors(num_rows: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((num_rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def retriever_over(vectors: np.ndarray, index_factory: str = "Flat", fingerprint: str = "f" * 16) -> ReavlRetriever:
    """A retriever over `vectors`; entry i has id `e{i}`, title `t{i}` and the tokens `[100 + i % 7] * (1 + i % 5)`."""
    num_rows = len(vectors)
    return ReavlRetriever.from_embeddings(
        ids=[f"e{row}" for row in range(num_rows)],
        titles=[f"t{row}" for row in range(num_rows)],
        input_ids=[[100 + row % 7] * (1 + row % 5) for row in range(num_rows)],
        embeddings=vectors,
        index_factory=index_factory,
        encoder_fingerprint=fingerprint,
    )


def brute_force_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Tokenizer, model, processor and an index of `TINY_KB` built by that model (in `knowledge/`)."""
    folder = tmp_path_factory.mktemp("tiny_world")
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    model = tiny_model(len(tokenizer))
    processor = tiny_processor(tokenizer)
    retriever = build_knowledge_index(model, processor, TINY_KB, folder / "knowledge", progress=False)
    return {"folder": folder, "tokenizer": tokenizer, "model": model, "processor": processor, "retriever": retriever}


# --------------------------------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_queries", [1, 16])  # below and above the batch size from which BLAS is switched on
def test_flat_search_equals_numpy_brute_force(num_queries):
    vectors = random_unit_vectors(1000, 32)
    queries = random_unit_vectors(num_queries, 32, seed=1)
    retriever = retriever_over(vectors)

    retrieved = retriever.retrieve(torch.from_numpy(queries), k=5)

    expected_scores, expected_rows = brute_force_top_k(vectors, queries, 5)
    assert retrieved["knowledge_indices"].tolist() == expected_rows.tolist()
    np.testing.assert_allclose(retrieved["knowledge_scores"].numpy(), expected_scores, atol=1e-5)
    assert retrieved["knowledge_scores"].dtype == torch.float32
    assert retrieved["ids"] == [[f"e{row}" for row in query_rows] for query_rows in expected_rows.tolist()]
    # the BLAS switch is scoped to the call
    assert retrieval_reavl._import_faiss().cvar.distance_compute_blas_threshold > 0


def test_hnsw32_recall_at_10_against_flat():
    vectors = random_unit_vectors(20_000, 64)
    queries = random_unit_vectors(200, 64, seed=1)
    flat_rows = retriever_over(vectors).search(queries, 10)[1]

    hnsw = retriever_over(vectors, "HNSW32")
    hnsw_rows = hnsw.search(queries, 10)[1]

    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw_rows.tolist(), flat_rows.tolist())])
    print(f"HNSW32 recall@10 vs Flat on 20k x 64 random vectors: {recall:.3f}")
    assert hnsw.index_factory == "HNSW32"
    assert recall >= 0.95


def test_ivf_pq_factory_is_clamped_to_the_data_and_searches():
    assert resolve_index_factory("IVF4096,PQ8", num_rows=2000, dim=32) == "IVF51,PQ8x5"
    assert resolve_index_factory("IVF16,PQ8", num_rows=100_000, dim=32) == "IVF16,PQ8x8"
    assert resolve_index_factory("HNSW32", num_rows=10, dim=32) == "HNSW32"
    with pytest.raises(ValueError, match=r"PQ7 .*divides the embedding size 32; choose one of \[1, 2, 4, 8, 16, 32\]"):
        resolve_index_factory("IVF16,PQ7", num_rows=2000, dim=32)

    # clustered data, as real embeddings are: IVF-PQ finds most true neighbours
    rng = np.random.default_rng(0)
    centres = random_unit_vectors(40, 32, seed=2)
    vectors = centres[rng.integers(0, 40, 4000)] + 0.15 * rng.standard_normal((4000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:50]
    retriever = retriever_over(vectors, "IVF4096,PQ16")
    assert retriever.index_factory == "IVF102,PQ16x6"
    rows = retriever.search(queries, 10)[1]
    exact_rows = brute_force_top_k(vectors, queries, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact_rows.tolist())])
    assert recall >= 0.5
    assert rows[:, 0].tolist() == list(range(50))  # every query finds itself first


def test_retrieve_returns_pretokenized_entries_padded_to_the_longest_hit():
    vectors = random_unit_vectors(50, 8)
    retriever = retriever_over(vectors)
    # query rows 1 (1 + 1 % 5 = 2 tokens), 3 (4 tokens) and 7 (3 tokens): each query is its own best hit
    retrieved = retriever.retrieve(vectors[[1, 3, 7]], k=2)

    rows = retrieved["knowledge_indices"]
    assert rows[:, 0].tolist() == [1, 3, 7]
    assert rows.dtype == torch.long
    lengths = 1 + rows % 5
    assert retrieved["knowledge_input_ids"].shape == (3, 2, int(lengths.max()))
    assert retrieved["knowledge_attention_mask"].sum(-1).tolist() == lengths.tolist()
    assert retrieved["knowledge_input_ids"][0, 0].tolist() == [101, 101, 0, 0, 0][: int(lengths.max())]
    assert retrieved["titles"][1][0] == "t3"
    # a dict-like result: the model reads it by key
    assert set(retrieved.keys()) == {"knowledge_input_ids", "knowledge_attention_mask", "knowledge_scores",
                                     "knowledge_indices", "ids", "titles"}


def test_get_entries_reads_any_rows_and_leaves_empty_slots_as_padding():
    retriever = retriever_over(random_unit_vectors(12, 8))
    input_ids, attention_mask = retriever.get_entries(np.array([[4, -1], [0, 9]]))
    assert input_ids.tolist() == [[[104] * 5, [0] * 5], [[100, 0, 0, 0, 0], [102, 102, 102, 102, 102]]]
    assert attention_mask.sum(-1).tolist() == [[5, 0], [1, 5]]
    assert [tokens.tolist() for tokens in retriever.token_ids([2, 11])] == [[102, 102, 102], [104, 104]]
    with pytest.raises(IndexError, match="row 12 is out of range for an index of 12 entries"):
        retriever.get_entries([12])


def test_lookup_by_id_and_properties():
    retriever = retriever_over(random_unit_vectors(12, 8), fingerprint="abc")
    assert retriever.index_of("e7") == 7
    assert retriever.ids[:3] == ["e0", "e1", "e2"] and retriever.titles[-1] == "t11"
    assert (len(retriever), retriever.dim, retriever.fingerprint) == (12, 8, "abc")
    with pytest.raises(KeyError, match="'nope'"):
        retriever.index_of("nope")
    with pytest.raises(ValueError, match=r"shape \(batch, 8\)"):
        retriever.retrieve(np.zeros((2, 9), np.float32), k=2)
    with pytest.raises(ValueError, match="k must be between 1 and the number of entries"):
        retriever.retrieve(np.zeros((2, 8), np.float32), k=13)


def test_update_embeddings_rebuilds_the_index_and_is_saved(tmp_path):
    retriever = retriever_over(random_unit_vectors(300, 16), "HNSW32")
    new_vectors = random_unit_vectors(300, 16, seed=5)
    queries = random_unit_vectors(4, 16, seed=6)

    retriever.update_embeddings(new_vectors, fingerprint="new-encoder")

    assert retriever.fingerprint == "new-encoder" and retriever.is_modified
    assert retriever.index_factory == "HNSW32"
    assert retriever.search(queries, 3)[1].tolist() == brute_force_top_k(new_vectors, queries, 3)[1].tolist()
    retriever.save(tmp_path / "knowledge")
    reloaded = ReavlRetriever.from_pretrained(tmp_path / "knowledge")
    assert reloaded.fingerprint == "new-encoder"
    np.testing.assert_array_equal(reloaded.embeddings, new_vectors)
    with pytest.raises(ValueError, match=r"one vector per entry, shape \(300, dim\)"):
        retriever.update_embeddings(new_vectors[:10], "x")


# --------------------------------------------------------------------------------------------------------------------
# the folder
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_factory", ["Flat", "HNSW32", "IVF8,Flat"])
def test_save_and_load_round_trip_memory_mapped(tmp_path, index_factory):
    vectors = random_unit_vectors(400, 16)
    queries = random_unit_vectors(5, 16, seed=1)
    retriever = retriever_over(vectors, index_factory)
    expected = retriever.retrieve(queries, k=4)

    retriever.save(tmp_path / "knowledge", rows_per_shard=150)
    loaded = ReavlRetriever.from_pretrained(tmp_path / "knowledge")
    retrieved = loaded.retrieve(queries, k=4)

    assert sorted(path.name for path in (tmp_path / "knowledge" / "data").iterdir()) == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    for name in ("knowledge_input_ids", "knowledge_attention_mask", "knowledge_indices", "knowledge_scores"):
        assert torch.equal(retrieved[name], expected[name]), name
    assert retrieved["ids"] == expected["ids"]
    np.testing.assert_array_equal(loaded.embeddings, vectors)
    # saving over the folder the (memory-mapped) index was read from keeps both usable
    loaded.save(tmp_path / "knowledge")
    assert torch.equal(loaded.retrieve(queries, k=4)["knowledge_indices"], expected["knowledge_indices"])
    assert torch.equal(ReavlRetriever.from_pretrained(tmp_path / "knowledge").retrieve(queries, 4)["knowledge_indices"],
                       expected["knowledge_indices"])


def test_a_failed_write_leaves_the_previous_index_intact(tmp_path, monkeypatch):
    folder = tmp_path / "knowledge"
    retriever_over(random_unit_vectors(30, 8, seed=0)).save(folder)
    before = {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    def fail_midway(knowledge_config):  # the card is written after the shards, the faiss file and the config
        raise OSError("disk full")

    monkeypatch.setattr(retrieval_reavl, "_dataset_card", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        retriever_over(random_unit_vectors(40, 8, seed=1)).save(folder)

    after = {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert after == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["knowledge"]  # no staging folder left behind
    assert len(ReavlRetriever.from_pretrained(folder)) == 30


def test_load_fails_when_the_index_and_the_dataset_disagree(tmp_path):
    retriever_over(random_unit_vectors(30, 8)).save(tmp_path / "knowledge")
    retriever_over(random_unit_vectors(20, 8)).save(tmp_path / "other")
    (tmp_path / "knowledge" / "index.faiss").write_bytes((tmp_path / "other" / "index.faiss").read_bytes())

    with pytest.raises(KnowledgeIndexError) as error:
        ReavlRetriever.from_pretrained(tmp_path / "knowledge")
    assert "index.faiss holds 20 vectors but the dataset has 30 rows" in str(error.value)
    assert "reavl build-index --model DIR --knowledge PATH --output DIR" in str(error.value)


def test_load_fails_on_a_newer_format_version_or_a_missing_file(tmp_path):
    folder = retriever_over(random_unit_vectors(10, 8)).save(tmp_path / "knowledge")
    config_path = folder / "knowledge_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(KnowledgeIndexError, match="format_version 99, but this code reads .* up to 1"):
        ReavlRetriever.from_pretrained(folder)

    config_path.write_text(json.dumps(config))
    (folder / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="not a REAVL knowledge index: missing index.faiss"):
        ReavlRetriever.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="could not be fetched"):
        ReavlRetriever.from_pretrained(tmp_path / "nowhere", local_files_only=True)


# --------------------------------------------------------------------------------------------------------------------
# building from a model
# --------------------------------------------------------------------------------------------------------------------


def test_build_knowledge_index_tokenizes_embeds_and_writes_the_folder(tiny_world):
    model, tokenizer, retriever = tiny_world["model"], tiny_world["tokenizer"], tiny_world["retriever"]
    folder = tiny_world["folder"] / "knowledge"
    titles = {entry["id"]: entry["title"] for entry in TINY_KB}

    assert retriever.ids == [entry["id"] for entry in TINY_KB]  # row order is the KB order despite length sorting
    for row, entry in enumerate(TINY_KB):
        text = entry_to_text(entry["title"], entry["text"], entry.get("triples", []), titles)
        expected_tokens = tokenizer(text, truncation=True, max_length=12)["input_ids"]
        assert retriever.token_ids([row])[0].tolist() == expected_tokens
        # each key equals the model's knowledge feature of the entry alone (no padding effect from batching)
        alone = model.get_knowledge_features(torch.tensor([expected_tokens]))[0].detach().numpy()
        np.testing.assert_allclose(retriever.embeddings[row], alone, atol=1e-5)
    assert retriever.token_ids([1])[0].tolist()[-1] == tokenizer.sep_token_id  # truncated at 12, still ends in [SEP]
    assert len(retriever.token_ids([1])[0]) == 12

    config = json.loads((folder / "knowledge_config.json").read_text())
    assert config == {"format_version": 1, "num_rows": 8, "dim": 16, "metric": "inner_product", "index_factory": "Flat",
                      "encoder_fingerprint": model.knowledge_encoder_fingerprint(), "max_length": 12,
                      "pad_token_id": 0}
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*")
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "data", "index.faiss", "knowledge_config.json"]


def test_the_folder_is_a_datasets_dataset(tiny_world, tmp_path):
    import datasets

    entries = datasets.load_dataset(str(tiny_world["folder"] / "knowledge"), split="train", cache_dir=str(tmp_path))
    assert entries.column_names == ["id", "title", "text", "aliases", "triples", "input_ids", "embedding"]
    assert entries[0]["aliases"] == ["city of light"] and entries[0]["triples"] == [["capital of", "Q142"]]
    assert entries[2]["input_ids"] == tiny_world["retriever"].token_ids([2])[0].tolist()
    np.testing.assert_allclose(np.array(entries["embedding"]), tiny_world["retriever"].embeddings, atol=0)


def test_build_rejects_a_knowledge_base_with_duplicate_ids(tiny_world, tmp_path):
    duplicated = [*TINY_KB, {"id": "Q90", "title": "Paris again", "text": "duplicate"}]
    with pytest.raises(KnowledgeBaseError, match=r"duplicated id\(s\).*'Q90' at rows \[0, 8\]"):
        build_knowledge_index(tiny_world["model"], tiny_world["tokenizer"], duplicated, tmp_path / "k", progress=False)
    assert not (tmp_path / "k").exists()


def test_embed_knowledge_entries_is_batch_invariant_and_restores_train_mode(tiny_world):
    model = ReavlForPreTraining(tiny_world["model"].config)  # a task model: the base sits at .reavl
    model.reavl.load_state_dict(tiny_world["model"].state_dict())
    model.train()
    entries = [[2, 40, 41, 3], [2, 50, 3], [2, 60, 61, 62, 63, 64, 3], [2, 70, 3]]

    batched = embed_knowledge_entries(model, entries, batch_size=3)

    assert model.training and model.reavl.training
    assert batched.shape == (4, 16) and batched.dtype == np.float32
    for row, tokens in enumerate(entries):
        np.testing.assert_allclose(batched[row], embed_knowledge_entries(model, [tokens], batch_size=1)[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# matching a model
# --------------------------------------------------------------------------------------------------------------------


def test_check_compatible_names_each_mismatch(tiny_world):
    retriever, model = tiny_world["retriever"], tiny_world["model"]
    retriever.check_compatible(model)  # built by this model: compatible

    narrower = tiny_model(len(tiny_world["tokenizer"]), retrieval_dim=8)
    with pytest.raises(ValueError) as error:
        narrower.set_retriever(retriever)
    message = str(error.value)
    assert "dimension: the index has dim 16 but the model's config.retrieval_dim is 8" in message
    assert "encoder fingerprint" in message and "reavl build-index --model DIR --knowledge PATH --output DIR" in message

    assert narrower.retriever is None  # nothing attached after a refusal

    task_model = ReavlForPreTraining(model.config)  # other weights; the base model sits at .reavl
    with pytest.raises(ValueError, match=f"fingerprint {retriever.fingerprint!r} but this model's is "
                                         f"{task_model.reavl.knowledge_encoder_fingerprint()!r}"):
        retriever.check_compatible(task_model)
    task_model.reavl.load_state_dict(model.state_dict())
    task_model.set_retriever(retriever)  # same weights: accepted


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def test_reavl_build_index_command(tiny_world, tmp_path, capsys):
    from training.cli import main as reavl

    model_dir = tmp_path / "model"
    tiny_world["model"].save_pretrained(model_dir)
    tiny_world["processor"].save_pretrained(model_dir)
    knowledge_file = tmp_path / "kb.jsonl"
    knowledge_file.write_text("\n".join(json.dumps(entry) for entry in TINY_KB) + "\n")

    status = reavl(["build-index", "--model", str(model_dir), "--knowledge", str(knowledge_file),
                    "--output", str(tmp_path / "index"), "--index-factory", "HNSW32", "--batch-size", "3"])

    assert status == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("built knowledge index: 8 rows, dim 16, HNSW32, ")
    built = ReavlRetriever.from_pretrained(tmp_path / "index")
    built.check_compatible(tiny_world["model"])
    assert built.ids == tiny_world["retriever"].ids
    np.testing.assert_allclose(built.embeddings, tiny_world["retriever"].embeddings, atol=1e-5)

    status = reavl(["build-index", "--model", str(model_dir), "--knowledge", str(tmp_path / "missing.jsonl"),
                    "--output", str(tmp_path / "index2")])
    assert status == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
