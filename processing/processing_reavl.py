# Copyright 2026 The REAVL authors. Licensed under the Apache License, Version 2.0.
"""REAVL processor: an image processor and a tokenizer (as `CLIPProcessor`), plus the knowledge retriever.

The processor holds only serializable retrieval settings (`processor_config.json`); the retriever is built lazily
from them:

- `knowledge_path` (default `"knowledge"`): an index folder RELATIVE to the folder the processor was saved to or
  loaded from (a local folder, or a Hub model repo, of which only that subfolder is fetched);
- or `knowledge_repo_id` + `knowledge_revision`: a Hub dataset repo holding the index (pin a commit sha);
- `num_knowledge`, `max_knowledge_length`: entries per example and tokens per entry.

```python
>>> processor = AutoProcessor.from_pretrained("user/reavl-base", trust_remote_code=True)
>>> inputs = processor(images=image, text="Who designed this tower?", return_tensors="pt")
>>> model.set_retriever(processor.retriever)           # forward now retrieves num_knowledge entries itself
>>> processor.save_pretrained("out")                  # writes out/knowledge/ too (or only the repo reference)
```

This file is copied to the Hub next to `retrieval_reavl.py` and imported as remote code, so it imports only
public names of installed packages and its sibling by relative import.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any

from transformers import ProcessorMixin

from .retrieval_reavl import ReavlRetriever


logger = logging.getLogger(__name__)

# Instance attributes that are runtime state, not settings: never serialized (nor deep-copied by `to_dict`).
_RUNTIME_ATTRIBUTES = ("_retriever", "_loaded_from")


def _load_image(image: Any, position: str) -> Any:
    """A path or URL becomes an RGB PIL image (a ValueError names an unreadable one); other inputs pass through."""
    if isinstance(image, (list, tuple)):
        return [_load_image(item, f"{position}[{index}]") for index, item in enumerate(image)]
    if not isinstance(image, (str, os.PathLike)):
        return image
    from transformers.image_utils import load_image

    try:
        return load_image(os.fspath(image)).convert("RGB")
    except Exception as error:  # PIL raises OSError, UnidentifiedImageError, ValueError, ... for bad files
        raise ValueError(f"cannot read image {os.fspath(image)!r} (images{position}): {error}") from error


def _check_relative(knowledge_path: str | None) -> None:
    if knowledge_path is None:
        return
    parts = PurePosixPath(str(knowledge_path).replace("\\", "/"))
    if parts.is_absolute() or Path(knowledge_path).is_absolute() or ".." in parts.parts:
        raise ValueError(
            f"knowledge_path must be a folder relative to the processor folder (e.g. 'knowledge'), got "
            f"{knowledge_path!r}; attach an index elsewhere with processor.set_knowledge(path)"
        )


class ReavlProcessor(ProcessorMixin):
    r"""
    Constructs a REAVL processor: a transformers image processor and a (BERT-family) tokenizer, with the retrieval
    settings of the knowledge index that the model reads.

    Args:
        image_processor (`BaseImageProcessor`): e.g. a `ViTImageProcessor` at the vision tower's image size.
        tokenizer (`PreTrainedTokenizerBase`): the text tower's tokenizer (also tokenizes knowledge entries).
        knowledge_path (`str`, *optional*, defaults to `"knowledge"`): the index folder, relative to the folder the
            processor is saved to / loaded from. Never absolute: saved folders move and get pushed.
        knowledge_repo_id (`str`, *optional*): a Hub dataset repo holding the index; when set, `save_pretrained`
            writes only this reference.
        knowledge_revision (`str`, *optional*): the revision of `knowledge_repo_id` (a commit sha pins it).
        num_knowledge (`int`, *optional*, defaults to 4): entries retrieved per example (`retrieve`'s default k).
        max_knowledge_length (`int`, *optional*, defaults to 64): tokens per knowledge entry.
    """

    # Recommended way (transformers 5) to set call defaults: BERT's token_type_ids are not a REAVL model input.
    text_kwargs = {"return_token_type_ids": False}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        knowledge_path: str | None = "knowledge",
        knowledge_repo_id: str | None = None,
        knowledge_revision: str | None = None,
        num_knowledge: int = 4,
        max_knowledge_length: int = 64,
        **kwargs,
    ):
        _check_relative(knowledge_path)
        if num_knowledge < 0:
            raise ValueError(f"num_knowledge must be >= 0, got {num_knowledge}")
        self.knowledge_path = knowledge_path
        self.knowledge_repo_id = knowledge_repo_id
        self.knowledge_revision = knowledge_revision
        self.num_knowledge = num_knowledge
        self.max_knowledge_length = max_knowledge_length
        self._retriever: ReavlRetriever | None = None
        # Where from_pretrained / save_pretrained found this processor: the base of knowledge_path. Memory only.
        self._loaded_from: dict[str, Any] | None = None
        super().__init__(image_processor, tokenizer, **kwargs)

    # ---- inputs --------------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, **kwargs):
        """Prepare `pixel_values` `(batch, 3, H, W)` and `input_ids`, `attention_mask` `(batch, length)`.

        `images`: PIL images, arrays, tensors, file paths or URLs (one, or a list). `text`: a string or a list of
        strings; `padding`, `truncation`, `max_length`, `return_tensors` go to the tokenizer as in `CLIPProcessor`.

        Raises:
            ValueError: an image cannot be read (its path is named) or a text is empty (its position is named).
        """
        if images is not None:
            images = _load_image(images, "")
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            empty = [position for position, sample in enumerate(texts) if isinstance(sample, str) and not sample.strip()]
            if empty:
                raise ValueError(f"text at position(s) {empty} is empty; every example needs a question or caption")
        return super().__call__(images=images, text=text, **kwargs)

    # ---- knowledge -------------------------------------------------------------------------------------------------

    @property
    def retriever(self) -> ReavlRetriever:
        """The knowledge retriever, built on first use from `knowledge_repo_id` or `knowledge_path`.

        Raises:
            FileNotFoundError: no index is attached and none is found where the settings point.
        """
        if self._retriever is None:
            self._retriever = self._build_retriever()
        return self._retriever

    def _build_retriever(self) -> ReavlRetriever:
        if self.knowledge_repo_id:
            hub_kwargs = (self._loaded_from or {}).get("hub_kwargs", {})
            return ReavlRetriever.from_pretrained(self.knowledge_repo_id, revision=self.knowledge_revision, **hub_kwargs)
        source = self._loaded_from
        if not self.knowledge_path or source is None:
            raise FileNotFoundError(
                "this processor has no knowledge index: attach one with processor.set_knowledge(retriever_or_path) "
                "(or build one with `reavl build-index`), or load the processor from a folder that holds "
                f"{self.knowledge_path or 'knowledge'}/"
            )
        if "local_dir" in source:
            folder = Path(source["local_dir"]) / self.knowledge_path
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"no knowledge index at {folder} (knowledge_path={self.knowledge_path!r} relative to the processor "
                    "folder); build one with `reavl build-index --model DIR --knowledge PATH --output DIR` or attach "
                    "one with processor.set_knowledge(...)"
                )
            return ReavlRetriever.from_pretrained(folder)
        # Loaded from a Hub model repo: fetch only its knowledge subfolder, at the same revision.
        return ReavlRetriever.from_pretrained(
            source["repo_id"], revision=source.get("revision"), repo_type="model",
            subfolder=self._join_subfolder(source.get("subfolder"), self.knowledge_path), **source["hub_kwargs"],
        )

    @staticmethod
    def _join_subfolder(subfolder: str | None, knowledge_path: str) -> str:
        return str(PurePosixPath(subfolder) / knowledge_path) if subfolder else knowledge_path

    @property
    def knowledge_available(self) -> bool:
        """Whether a retriever is attached or the settings point at an index (without loading it)."""
        if self._retriever is not None or self.knowledge_repo_id:
            return True
        source = self._loaded_from or {}
        if "local_dir" in source and self.knowledge_path:
            return (Path(source["local_dir"]) / self.knowledge_path).is_dir()
        return "repo_id" in source and bool(self.knowledge_path)

    def set_knowledge(self, retriever_or_path: ReavlRetriever | str | os.PathLike | None, revision: str | None = None,
                      **hub_kwargs) -> ReavlRetriever | None:
        """Attach a knowledge index and return its retriever.

        Args:
            retriever_or_path: a `ReavlRetriever`, a local index folder (both are written into the processor folder
                by `save_pretrained`), a Hub dataset repo id (only the reference is saved: `knowledge_repo_id`,
                `knowledge_revision`), or `None` to detach.
            revision: revision of a Hub repo id (pin a commit sha).
            **hub_kwargs: `cache_dir`, `token`, `local_files_only` for a Hub repo id.
        """
        if retriever_or_path is None:
            self._retriever = None
            return None
        if isinstance(retriever_or_path, ReavlRetriever):
            self._retriever, self.knowledge_repo_id, self.knowledge_revision = retriever_or_path, None, None
        elif Path(retriever_or_path).exists():
            self._retriever = ReavlRetriever.from_pretrained(retriever_or_path)
            self.knowledge_repo_id, self.knowledge_revision = None, None
        else:
            self._retriever = ReavlRetriever.from_pretrained(str(retriever_or_path), revision=revision, **hub_kwargs)
            self.knowledge_repo_id, self.knowledge_revision = str(retriever_or_path), revision
            self._loaded_from = {**(self._loaded_from or {}), "hub_kwargs": hub_kwargs}
        self.knowledge_path = self.knowledge_path or "knowledge"
        return self._retriever

    def retrieve(self, query_embeddings, k: int | None = None):
        """`self.retriever.retrieve(query_embeddings, k)` with `k` defaulting to `num_knowledge`: a `BatchEncoding`
        with `knowledge_input_ids`, `knowledge_attention_mask` `(batch, k, length)`, `knowledge_scores`,
        `knowledge_indices` `(batch, k)`, `ids`, `titles`."""
        return self.retriever.retrieve(query_embeddings, self.num_knowledge if k is None else k)

    # ---- saving and loading ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        # ProcessorMixin.to_dict deep-copies every instance attribute before it filters them; the retriever (a faiss
        # index, maybe memory-mapped) must not be copied and is no setting. Set it aside for the call.
        runtime_state = {name: self.__dict__.pop(name) for name in _RUNTIME_ATTRIBUTES if name in self.__dict__}
        try:
            return super().to_dict()
        finally:
            self.__dict__.update(runtime_state)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save the processor, and the knowledge index into `save_directory/knowledge_path` when the knowledge is
        local (atomically, by `ReavlRetriever.save`); with `knowledge_repo_id` only the reference is saved. No
        absolute path is written."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        # The index goes in first, so that push_to_hub (which uploads the files changed by the save) carries it.
        if not self.knowledge_repo_id and self.knowledge_path and self.knowledge_available:
            retriever = self.retriever
            target = save_directory / self.knowledge_path
            already_there = (
                retriever.source_dir is not None and not retriever.is_modified
                and target.resolve() == Path(retriever.source_dir).resolve()
            )
            if not already_there:
                retriever.save(target)
        elif not self.knowledge_repo_id:
            logger.info("processor saved without a knowledge index (none attached)")
        files = super().save_pretrained(str(save_directory), push_to_hub=push_to_hub, **kwargs)
        if self._loaded_from is None or "local_dir" not in self._loaded_from:
            self._loaded_from = {**(self._loaded_from or {}), "local_dir": str(save_directory.resolve())}
        return files

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str = "main",
        **kwargs,
    ) -> "ReavlProcessor":
        """`ProcessorMixin.from_pretrained`, remembering where the processor came from so that `knowledge_path`
        resolves against it (a local folder, or the same Hub model repo and revision)."""
        processor = super().from_pretrained(
            pretrained_model_name_or_path, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, token=token, revision=revision, **kwargs,
        )
        subfolder = kwargs.get("subfolder") or None
        hub_kwargs = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
        local = Path(pretrained_model_name_or_path)
        if local.is_dir():
            base = local / subfolder if subfolder else local
            processor._loaded_from = {"local_dir": str(base.resolve()), "hub_kwargs": hub_kwargs}
        else:
            processor._loaded_from = {
                "repo_id": str(pretrained_model_name_or_path), "revision": revision, "subfolder": subfolder,
                "hub_kwargs": hub_kwargs,
            }
        return processor


__all__ = ["ReavlProcessor"]
