"""ReavlProcessor (issue 3): images + text like CLIPProcessor, serializable retrieval settings, the lazily built
retriever, and save/load of processor + knowledge index, including as Hub remote code in a fresh interpreter that
cannot import this project.

The tiny tokenizer, model, processor and knowledge base come from `tests/test_retrieval.py`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from processing import ReavlProcessor, ReavlRetriever, build_knowledge_index
from tests.remote_code_helpers import run_isolated_json
from tests.test_retrieval import TINY_KB, tiny_model, tiny_processor, tiny_tokenizer


QUERY_TEXTS = ["the eiffel tower in paris", "lake geneva", "a river in france", "the highest peak"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A processor with an index of `TINY_KB` attached, and retrieval queries of the tiny model `(4, 16)`."""
    folder = tmp_path_factory.mktemp("processing_world")
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    model = tiny_model(len(tokenizer))
    processor = tiny_processor(tokenizer)
    retriever = build_knowledge_index(model, processor, TINY_KB, folder / "built_knowledge", progress=False)
    processor.set_knowledge(retriever)
    text = processor(text=QUERY_TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        queries = model.get_query_embeddings(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    return {"folder": folder, "model": model, "processor": processor, "retriever": retriever, "queries": queries}


def _files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


# --------------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------------


def test_processor_prepares_images_of_any_kind_and_text(world, tmp_path):
    processor = world["processor"]
    photo_path = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(photo_path)
    images = [Image.new("RGB", (64, 48), (255, 0, 0)), np.zeros((20, 20, 3), np.uint8), str(photo_path)]

    inputs = processor(images=images, text=["paris", "the old bridge on the seine", "alps"], return_tensors="pt",
                       padding="max_length", truncation=True, max_length=8)

    assert set(inputs.keys()) == {"pixel_values", "input_ids", "attention_mask"}  # no token_type_ids
    assert inputs["pixel_values"].shape == (3, 3, 30, 30)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (3, 8)
    # red image, mean = std = 0.5: channel 0 is (1 - 0.5) / 0.5 = 1, the others -1; the grey file is 200/255
    torch.testing.assert_close(inputs["pixel_values"][0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(inputs["pixel_values"][2, 0, 0, 0], torch.tensor(200 / 255 * 2 - 1))
    assert inputs["input_ids"][0].tolist() == processor.tokenizer("paris", padding="max_length", max_length=8)[
        "input_ids"]
    assert processor(text="paris")["input_ids"] == processor.tokenizer("paris")["input_ids"]


def test_unreadable_images_and_empty_texts_are_named(world, tmp_path):
    processor = world["processor"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=rf"cannot read image '{broken}' \(images\[1\]\)"):
        processor(images=[Image.new("RGB", (8, 8)), str(broken)], text=["a", "b"])
    with pytest.raises(ValueError, match=r"cannot read image '.*missing.png'"):
        processor(images=str(tmp_path / "missing.png"), text="a")
    with pytest.raises(ValueError, match=r"text at position\(s\) \[1\] is empty"):
        processor(text=["paris", "  "])


# --------------------------------------------------------------------------------------------------------------------
# retrieval settings and the retriever
# --------------------------------------------------------------------------------------------------------------------


def test_retrieve_delegates_with_num_knowledge_as_default_k(world):
    processor, retriever, queries = world["processor"], world["retriever"], world["queries"]
    retrieved = processor.retrieve(queries)
    assert retrieved["knowledge_indices"].shape == (4, 3)  # num_knowledge=3
    assert torch.equal(retrieved["knowledge_indices"], retriever.retrieve(queries, 3)["knowledge_indices"])
    assert processor.retrieve(queries, k=5)["knowledge_input_ids"].shape[:2] == (4, 5)


def test_knowledge_path_must_be_relative_and_a_missing_index_is_explained(world, tmp_path):
    with pytest.raises(ValueError, match="knowledge_path must be a folder relative to the processor folder"):
        tiny_processor(world["processor"].tokenizer, knowledge_path=str(tmp_path / "knowledge"))
    with pytest.raises(ValueError, match="relative"):
        tiny_processor(world["processor"].tokenizer, knowledge_path="../knowledge")

    bare = tiny_processor(world["processor"].tokenizer)
    assert not bare.knowledge_available
    with pytest.raises(FileNotFoundError, match=r"no knowledge index: attach one with processor.set_knowledge"):
        bare.retriever
    bare.save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "bare" / "knowledge").exists()
    reloaded = ReavlProcessor.from_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=r"no knowledge index at .*bare/knowledge .*reavl build-index"):
        reloaded.retriever


def test_set_knowledge_from_a_folder(world):
    processor = tiny_processor(world["processor"].tokenizer)
    retriever = processor.set_knowledge(world["folder"] / "built_knowledge")
    assert processor.retriever is retriever and len(retriever) == len(TINY_KB)
    assert processor.knowledge_path == "knowledge" and processor.knowledge_repo_id is None


# --------------------------------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_writes_the_index_and_no_absolute_path(world, tmp_path):
    saved = tmp_path / "saved"
    world["processor"].save_pretrained(saved)

    files = _files_under(saved)
    assert {"processor_config.json", "processing_reavl.py", "retrieval_reavl.py", "knowledge/index.faiss",
            "knowledge/knowledge_config.json", "knowledge/README.md",
            "knowledge/data/train-00000-of-00001.parquet"} <= set(files)
    config = json.loads(files["processor_config.json"])
    assert config["auto_map"] == {"AutoProcessor": "processing_reavl.ReavlProcessor"}
    assert (config["knowledge_path"], config["knowledge_repo_id"], config["num_knowledge"]) == ("knowledge", None, 3)
    for name, content in files.items():  # a saved folder moves and gets pushed: no machine paths anywhere
        assert str(tmp_path).encode() not in content, name
        assert str(world["folder"]).encode() not in content, name
    # the copy is the index the processor searched
    assert files["knowledge/index.faiss"] == (world["folder"] / "built_knowledge" / "index.faiss").read_bytes()


def test_from_pretrained_builds_the_retriever_lazily_from_the_saved_folder(world, tmp_path):
    world["processor"].save_pretrained(tmp_path / "saved")
    shutil.move(tmp_path / "saved", tmp_path / "moved")  # relative knowledge_path: the folder can move

    loaded = AutoProcessor.from_pretrained(tmp_path / "moved")

    assert isinstance(loaded, ReavlProcessor) and loaded._retriever is None
    expected = world["processor"].retrieve(world["queries"])
    retrieved = loaded.retrieve(world["queries"])
    assert loaded.retriever.source_dir == tmp_path / "moved" / "knowledge"
    for name in ("knowledge_input_ids", "knowledge_attention_mask", "knowledge_indices", "knowledge_scores"):
        assert torch.equal(retrieved[name], expected[name]), name
    assert retrieved["titles"] == expected["titles"]

    # saving again into the folder it was loaded from leaves the index files as they are
    before = (tmp_path / "moved" / "knowledge" / "index.faiss").stat().st_mtime_ns
    loaded.save_pretrained(tmp_path / "moved")
    assert (tmp_path / "moved" / "knowledge" / "index.faiss").stat().st_mtime_ns == before


def test_fresh_interpreter_loads_processor_and_index_as_remote_code(world, tmp_path):
    world["processor"].save_pretrained(tmp_path / "exported")
    np.save(tmp_path / "queries.npy", world["queries"].numpy())
    expected = world["processor"].retrieve(world["queries"])

    result = run_isolated_json(
        """
        import importlib, sys
        import numpy as np
        from transformers import AutoProcessor

        for name in BLOCKED_PACKAGES:
            try:
                importlib.import_module(name)
                raise SystemExit(f"{name} should not be importable here")
            except ImportError:
                pass
        processor = AutoProcessor.from_pretrained("exported", trust_remote_code=True)
        retrieved = processor.retrieve(np.load("queries.npy"))
        inputs = processor(images=[np.zeros((30, 30, 3), np.uint8)], text=["paris"], return_tensors="pt")
        emit({
            "class_module": type(processor).__module__,
            "retriever_module": type(processor.retriever).__module__,
            "input_names": sorted(inputs.keys()),
            "indices": retrieved["knowledge_indices"].tolist(),
            "scores": retrieved["knowledge_scores"].tolist(),
            "input_ids": retrieved["knowledge_input_ids"].tolist(),
            "attention_mask": retrieved["knowledge_attention_mask"].tolist(),
            "ids": retrieved["ids"],
            "titles": retrieved["titles"],
            "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED_PACKAGES),
        })
        """,
        cwd=tmp_path,
    )

    assert result["class_module"].startswith("transformers_modules.") and result["class_module"].endswith(
        "processing_reavl")
    assert result["retriever_module"].endswith("retrieval_reavl") and result["project_modules"] == []
    assert result["input_names"] == ["attention_mask", "input_ids", "pixel_values"]
    assert result["indices"] == expected["knowledge_indices"].tolist()
    assert result["scores"] == expected["knowledge_scores"].tolist()  # float32 values survive JSON exactly
    assert result["input_ids"] == expected["knowledge_input_ids"].tolist()
    assert result["attention_mask"] == expected["knowledge_attention_mask"].tolist()
    assert (result["ids"], result["titles"]) == (expected["ids"], expected["titles"])


def _fake_hub_cache(cache_dir: Path, repo_id: str, index_folder: Path, commit: str) -> None:
    """Lay out `index_folder` as huggingface_hub's cache holds a downloaded dataset repo at `commit`."""
    repo_cache = cache_dir / f"datasets--{repo_id.replace('/', '--')}"
    shutil.copytree(index_folder, repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text(commit)


def test_knowledge_in_a_hub_dataset_repo_is_saved_as_a_pinned_reference(world, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hub", "someone/tiny-kb", world["folder"] / "built_knowledge", commit)
    processor = tiny_processor(world["processor"].tokenizer)

    processor.set_knowledge("someone/tiny-kb", revision=commit, cache_dir=tmp_path / "hub", local_files_only=True)
    processor.save_pretrained(tmp_path / "saved")

    assert not (tmp_path / "saved" / "knowledge").exists()
    config = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert (config["knowledge_repo_id"], config["knowledge_revision"]) == ("someone/tiny-kb", commit)
    loaded = ReavlProcessor.from_pretrained(tmp_path / "saved", cache_dir=tmp_path / "hub", local_files_only=True)
    assert loaded.retriever.repo_id == "someone/tiny-kb"
    assert torch.equal(loaded.retrieve(world["queries"])["knowledge_indices"],
                       world["processor"].retrieve(world["queries"])["knowledge_indices"])
    with pytest.raises(FileNotFoundError, match="'someone/other-kb'.*could not be fetched"):
        ReavlRetriever.from_pretrained("someone/other-kb", cache_dir=tmp_path / "hub", local_files_only=True)


def test_model_with_the_processor_retriever_attached_retrieves_in_forward(world):
    """Item 5 of the issue: `model.set_retriever(processor.retriever)`, then a forward without knowledge tensors
    retrieves exactly what the retriever returns for the model's own queries."""
    model, processor = world["model"], world["processor"]
    inputs = processor(images=[np.full((30, 30, 3), 90, np.uint8)] * 4, text=QUERY_TEXTS, return_tensors="pt",
                       padding=True)
    model.set_retriever(processor.retriever)
    try:
        with torch.no_grad():
            outputs = model(**inputs)
            queries = model.get_query_embeddings(**inputs)
    finally:
        model.set_retriever(None)
    expected = processor.retriever.retrieve(queries, model.config.num_knowledge)
    assert outputs.knowledge_indices.shape == (4, 3)
    assert torch.equal(outputs.knowledge_indices, expected["knowledge_indices"])
    torch.testing.assert_close(outputs.knowledge_scores, expected["knowledge_scores"])
