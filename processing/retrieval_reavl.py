# Copyright 2026 The REAVL authors. Licensed under the Apache License, Version 2.0.
"""REAVL knowledge retriever: a faiss index over a pre-tokenized knowledge dataset, searched in one batched call.

A knowledge index is a folder (inside a model repo as ``knowledge/``, or a Hub dataset repo of its own)::

    knowledge/
      data/train-00000-of-00001.parquet   # id, title, text, aliases, triples, input_ids (unpadded), embedding
      index.faiss                         # faiss row i == dataset row i; metric inner product
      knowledge_config.json               # format_version, num_rows, dim, metric, index_factory,
                                          # encoder_fingerprint, max_length, pad_token_id
      README.md                           # dataset card (`configs`/`data_files` metadata: `load_dataset` reads it)

`ReavlRetriever.retrieve(query_embeddings, k)` searches the index for a whole batch at once and gathers the stored
token ids of the hits into padded `(batch, k, length)` tensors with NumPy indexing: no per-query Python loop, no
re-tokenisation, no round trip through text (what makes transformers' `RagRetriever` slow).

This file is copied to the Hub next to `processing_reavl.py` and imported as remote code, so it imports only public
names of installed packages; faiss and pyarrow are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from transformers import BatchEncoding


logger = logging.getLogger(__name__)

KNOWLEDGE_FORMAT_VERSION = 1
KNOWLEDGE_CONFIG_NAME = "knowledge_config.json"
KNOWLEDGE_INDEX_NAME = "index.faiss"
KNOWLEDGE_DATA_DIR = "data"
KNOWLEDGE_CARD_NAME = "README.md"
METRIC_INNER_PRODUCT = "inner_product"
REBUILD_COMMAND = "reavl build-index --model DIR --knowledge PATH --output DIR"
# ~1 KB of embedding per row at dim 256: 100k rows keep a shard near the Hub's recommended few hundred MB.
DEFAULT_ROWS_PER_SHARD = 100_000
# faiss switches its exact search to BLAS only for large query batches (nq * d over ~128k); from a handful of
# queries on, BLAS is several times faster (measured: 32 queries, 10k x 256, 1 thread: 17 ms -> 7 ms).
BLAS_MIN_QUERIES = 8
# Search-time defaults written into the index file (faiss stores efSearch / nprobe with the index).
HNSW_EF_SEARCH = 128
IVF_MIN_POINTS_PER_LIST = 39  # faiss k-means warns below 39 training points per centroid

METADATA_COLUMNS = ("id", "title", "text", "aliases", "triples")


class KnowledgeIndexError(ValueError):
    """A knowledge index folder is missing a file, is inconsistent, or does not match a model."""


# --------------------------------------------------------------------------------------------------------------------
# faiss helpers
# --------------------------------------------------------------------------------------------------------------------


def _import_faiss():
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("REAVL knowledge retrieval needs faiss: pip install faiss-cpu") from error
    return faiss


def resolve_index_factory(index_factory: str, num_rows: int, dim: int) -> str:
    """The faiss factory string actually built for `num_rows` vectors of size `dim`.

    `IVF{n}` is clamped to `num_rows // 39` lists (k-means needs ~39 points per centroid); `PQ{m}[x{bits}]` must
    divide `dim`, and its bits are lowered until each of the `2**bits` codewords has ~39 training rows.

    >>> resolve_index_factory("IVF4096,PQ8", num_rows=2000, dim=64)
    'IVF51,PQ8x5'
    """
    factory = index_factory.strip()
    if not factory:
        raise ValueError("index_factory is empty; use e.g. 'Flat', 'HNSW32' or 'IVF1024,PQ32'")

    def clamp_lists(match: re.Match) -> str:
        requested = int(match.group(1))
        lists = max(1, min(requested, num_rows // IVF_MIN_POINTS_PER_LIST))
        if lists != requested:
            logger.info("index factory: IVF%d clamped to IVF%d for %d rows", requested, lists, num_rows)
        return f"IVF{lists}"

    def check_pq(match: re.Match) -> str:
        sub_quantizers, bits = int(match.group(1)), int(match.group(2) or 8)
        if dim % sub_quantizers != 0:
            divisors = [m for m in range(1, dim + 1) if dim % m == 0]
            raise ValueError(
                f"index factory {index_factory!r}: PQ{sub_quantizers} needs a number of sub-quantizers that divides "
                f"the embedding size {dim}; choose one of {divisors}"
            )
        # Each of the 2**bits codewords gets k-means training points like an IVF list does.
        bits = min(bits, max(1, int(math.log2(max(num_rows // IVF_MIN_POINTS_PER_LIST, 2)))))
        return f"PQ{sub_quantizers}x{bits}"

    factory = re.sub(r"IVF(\d+)", clamp_lists, factory)
    # "OPQ16" (a rotation) and fast-scan "PQ16x4fs" (fixed 4 bits) are left alone.
    return re.sub(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?(?![\dfx])", check_pq, factory)


def build_faiss_index(embeddings: np.ndarray, index_factory: str = "Flat", seed: int = 0):
    """Build an inner-product faiss index over `embeddings` `(num_rows, dim)`; row i of the index is row i.

    Returns `(index, factory)` where `factory` is the string actually built (see `resolve_index_factory`). Trainable
    indexes (IVF, PQ) are trained on a random sample of at most `max(256 * 39, 64 * lists)` rows.
    """
    faiss = _import_faiss()
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (num_rows, dim) matrix, got shape {embeddings.shape}")
    num_rows, dim = embeddings.shape
    factory = resolve_index_factory(index_factory, num_rows, dim)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"faiss cannot build index factory {factory!r}: {error}") from error
    # The factory turns on polysemous training for PQ codes (20x slower training, for Hamming-filtered search that
    # REAVL does not use).
    for part in (index, _extract_ivf(index)):
        part = faiss.downcast_index(part) if part is not None else None
        if part is not None and hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    if not index.is_trained:
        lists = int(re.search(r"IVF(\d+)", factory).group(1)) if "IVF" in factory else 1
        sample_size = min(num_rows, max(256 * IVF_MIN_POINTS_PER_LIST, 64 * lists))
        sample_rows = np.sort(np.random.default_rng(seed).choice(num_rows, size=sample_size, replace=False))
        index.train(embeddings[sample_rows])
    index.add(embeddings)
    _set_search_defaults(index)
    return index, factory


def _extract_ivf(index):
    """The IVF part of an index (also inside a pre-transform), or None."""
    try:
        return _import_faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def _set_search_defaults(index) -> None:
    """Search-time knobs that faiss stores in the index file: IVF probes 1/16 of its lists (at least 8), HNSW
    explores 128 candidates (recall@10 >= 0.95 on hard random data)."""
    faiss = _import_faiss()
    ivf = _extract_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, max(8, ivf.nlist // 16))
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = max(hnsw.efSearch, HNSW_EF_SEARCH)


def _read_faiss_index(path: Path, index_factory: str, mmap: bool):
    """Read an index file, memory-mapped where faiss supports it: flat codes (Flat, and the vectors of HNSW; the
    graph is read into memory) with `IO_FLAG_MMAP_IFC`, inverted lists (IVF) with `IO_FLAG_MMAP`."""
    faiss = _import_faiss()
    if mmap:
        flag = faiss.IO_FLAG_MMAP if "IVF" in index_factory else getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
        try:
            return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as error:
            logger.info("faiss cannot memory-map %s (%s); reading it into memory", path, error)
    return faiss.read_index(str(path))


@contextlib.contextmanager
def _blas_for(num_queries: int) -> Iterator[None]:
    """Let faiss use BLAS for an exact search of `num_queries` (>= BLAS_MIN_QUERIES) queries; restore after."""
    faiss = _import_faiss()
    previous = faiss.cvar.distance_compute_blas_threshold
    if num_queries >= BLAS_MIN_QUERIES:
        faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = previous


# --------------------------------------------------------------------------------------------------------------------
# folder I/O
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it replaces `target`, on error it is removed.

    A crash or exception while writing leaves a previous `target` untouched. The swap is two renames (old folder
    aside, staging folder in), so only a crash between them leaves `target` missing, with the old folder kept as
    `.{name}.old-*` beside it.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    staging = target.parent / f".{target.name}.tmp-{token}"
    staging.mkdir()  # plain mkdir (not mkdtemp) so the folder gets the user's umask, not 0700
    try:
        yield staging
        backup = None
        if target.exists():
            backup = target.parent / f".{target.name}.old-{token}"
            os.replace(target, backup)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _shard_paths(folder: Path) -> list[Path]:
    return sorted((folder / KNOWLEDGE_DATA_DIR).glob("*.parquet"))


def _dataset_card(knowledge_config: dict[str, Any]) -> str:
    config_lines = "\n".join(f"| `{key}` | `{value}` |" for key, value in knowledge_config.items())
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {KNOWLEDGE_DATA_DIR}/train-*.parquet
tags:
- reavl
- knowledge-base
- faiss
---

# REAVL knowledge index

A knowledge base of {knowledge_config["num_rows"]} entries, pre-tokenized and embedded by a REAVL knowledge encoder,
with a faiss index over the embeddings (`{KNOWLEDGE_INDEX_NAME}`, row i == dataset row i, inner product).

| column | content |
|---|---|
| `id`, `title`, `text` | the entry |
| `aliases`, `triples` | other names; `[relation, tail id]` facts |
| `input_ids` | token ids of the entry text (title, text, facts), unpadded, at most `max_length` |
| `embedding` | the `dim`-sized L2-normalised retrieval key (float32) |

| `{KNOWLEDGE_CONFIG_NAME}` | value |
|---|---|
{config_lines}

The index only serves models whose knowledge encoder has the fingerprint above; rebuild it for another model with
`{REBUILD_COMMAND}`.

```python
from datasets import load_dataset
entries = load_dataset("<this repo or folder>", split="train")

from processing.retrieval_reavl import ReavlRetriever  # or retrieval_reavl.py from the model repo
retriever = ReavlRetriever.from_pretrained("<this repo or folder>")
retrieved = retriever.retrieve(model.get_query_embeddings(**inputs), k=4)
```
"""


def _list_column_to_flat(column) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow list<int> column to `(values, offsets)` without Python objects (respects slices)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return values, offsets


# --------------------------------------------------------------------------------------------------------------------
# retriever
# --------------------------------------------------------------------------------------------------------------------


class ReavlRetriever:
    """Dense knowledge retriever over a REAVL knowledge index.

    Build one with [`ReavlRetriever.from_pretrained`] (a `knowledge/` folder, or a Hub dataset repo), with
    [`ReavlRetriever.from_embeddings`] (arrays in memory), or with `processing.knowledge_index.build_knowledge_index`.

    Example:

    ```python
    >>> retriever = ReavlRetriever.from_pretrained("path/to/knowledge")   # or "user/kb-index", revision="<sha>"
    >>> retriever.check_compatible(model)                                 # same dim and encoder fingerprint
    >>> retrieved = retriever.retrieve(model.get_query_embeddings(pixel_values, input_ids), k=4)
    >>> retrieved["knowledge_input_ids"].shape, retrieved["titles"][0]
    (torch.Size([2, 4, 37]), ['Eiffel Tower', 'Paris', ...])
    ```

    Args (low level; prefer the class methods):
        entries: a `pyarrow.Table` with the columns id, title, text, aliases, triples and input_ids (list of int).
        index: a faiss index with one vector per entry, inner product metric.
        knowledge_config: the `knowledge_config.json` content (num_rows, dim, index_factory, encoder_fingerprint,
            max_length, pad_token_id, ...).
        embeddings: `(num_rows, dim)` float32 vectors of the index; `None` reads them from `source_dir` on demand.
        source_dir: the folder the index was read from (for the lazy embeddings and error messages).
    """

    def __init__(
        self,
        entries,
        index,
        knowledge_config: dict[str, Any],
        embeddings: np.ndarray | None = None,
        source_dir: str | os.PathLike | None = None,
    ):
        self.config = dict(knowledge_config)
        self.index = index
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.repo_id: str | None = None  # set by from_pretrained when read from the Hub
        self.revision: str | None = None
        self.is_modified = False  # True after update_embeddings: the folder no longer holds what is searched
        self._entries = entries.select([name for name in METADATA_COLUMNS if name in entries.column_names])
        self._token_values, self._token_offsets = _list_column_to_flat(entries.column("input_ids"))
        self._ids_array = np.asarray(self._entries.column("id").to_pylist(), dtype=object)
        self._titles_array = np.asarray(self._entries.column("title").to_pylist(), dtype=object)
        self._row_of_id: dict[str, int] | None = None
        self._embeddings = None if embeddings is None else np.ascontiguousarray(embeddings, dtype=np.float32)
        self._check_consistent()

    # ---- construction ----------------------------------------------------------------------------------------------

    @classmethod
    def from_embeddings(
        cls,
        ids: Sequence[str],
        titles: Sequence[str],
        input_ids: Sequence[Sequence[int]],
        embeddings: np.ndarray,
        *,
        texts: Sequence[str] | None = None,
        aliases: Sequence[Sequence[str]] | None = None,
        triples: Sequence[Sequence[Sequence[str]]] | None = None,
        index_factory: str = "Flat",
        encoder_fingerprint: str = "",
        max_length: int | None = None,
        pad_token_id: int = 0,
    ) -> "ReavlRetriever":
        """Build a retriever in memory from entries, their token ids `(num_rows, ragged)` and their embeddings
        `(num_rows, dim)` (L2-normalised retrieval keys). Save it with [`save`]."""
        import pyarrow as pa

        num_rows = len(ids)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != num_rows:
            raise ValueError(f"embeddings must have shape ({num_rows}, dim) for {num_rows} ids, got {embeddings.shape}")
        for name, column in (("titles", titles), ("input_ids", input_ids), ("texts", texts), ("aliases", aliases),
                             ("triples", triples)):
            if column is not None and len(column) != num_rows:
                raise ValueError(f"{name} has {len(column)} rows but there are {num_rows} ids")
        entries = pa.table(
            {
                "id": pa.array(list(ids), pa.string()),
                "title": pa.array(list(titles), pa.string()),
                "text": pa.array(list(texts) if texts is not None else [""] * num_rows, pa.string()),
                "aliases": pa.array([list(a or ()) for a in aliases] if aliases is not None else [[]] * num_rows,
                                    pa.list_(pa.string())),
                "triples": pa.array([[list(t) for t in entry or ()] for entry in triples] if triples is not None
                                    else [[]] * num_rows, pa.list_(pa.list_(pa.string()))),
                "input_ids": pa.array([list(map(int, tokens)) for tokens in input_ids], pa.list_(pa.int32())),
            }
        )
        index, factory = build_faiss_index(embeddings, index_factory)
        lengths = [len(tokens) for tokens in input_ids]
        knowledge_config = {
            "format_version": KNOWLEDGE_FORMAT_VERSION,
            "num_rows": num_rows,
            "dim": int(embeddings.shape[1]),
            "metric": METRIC_INNER_PRODUCT,
            "index_factory": factory,
            "encoder_fingerprint": encoder_fingerprint,
            "max_length": int(max_length if max_length is not None else max(lengths, default=0)),
            "pad_token_id": int(pad_token_id),
        }
        return cls(entries, index, knowledge_config, embeddings=embeddings)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        *,
        repo_type: str = "dataset",
        subfolder: str | None = None,
        mmap: bool = True,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> "ReavlRetriever":
        """Load a knowledge index from a local folder or a Hub repo.

        Args:
            path_or_repo_id: a `knowledge/` folder, or a Hub repo id (fetched with `huggingface_hub.snapshot_download`,
                which serves it from the local cache when offline).
            revision: the Hub revision (pin a commit sha for reproducible retrieval).
            repo_type: `"dataset"` (a knowledge dataset repo) or `"model"` (a model repo holding `subfolder`).
            subfolder: the index folder inside the repo or folder, e.g. `"knowledge"`.
            mmap: memory-map the faiss file where faiss allows (Flat and HNSW vectors, IVF lists).

        Raises:
            FileNotFoundError: no such folder and the repo cannot be fetched, or a file of the index is missing.
            KnowledgeIndexError: the folder is inconsistent (row counts, dimension) or from a newer format version.
        """
        local = Path(path_or_repo_id)
        repo_id = None
        if local.exists():
            folder = local / subfolder if subfolder else local
        else:
            repo_id = str(path_or_repo_id)
            from huggingface_hub import snapshot_download

            patterns = [f"{subfolder.strip('/')}/*", f"{subfolder.strip('/')}/**"] if subfolder else None
            try:
                snapshot = snapshot_download(
                    repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns, cache_dir=cache_dir,
                    token=token, local_files_only=local_files_only,
                )
            except Exception as error:  # HFValidationError, offline cache misses, HTTP errors: all mean "not found"
                raise FileNotFoundError(
                    f"no knowledge index folder at {str(path_or_repo_id)!r}, and the Hub {repo_type} repo "
                    f"{repo_id!r} (revision {revision or 'main'}) could not be fetched: {error}"
                ) from error
            folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
        retriever = cls._from_folder(folder, mmap=mmap)
        retriever.repo_id, retriever.revision = repo_id, revision
        return retriever

    @classmethod
    def _from_folder(cls, folder: Path, mmap: bool) -> "ReavlRetriever":
        import pyarrow as pa
        import pyarrow.parquet as pq

        config_path, index_path, shards = folder / KNOWLEDGE_CONFIG_NAME, folder / KNOWLEDGE_INDEX_NAME, None
        if folder.is_dir():
            shards = _shard_paths(folder)
        missing = [path.name for path in (config_path, index_path) if not path.is_file()]
        if not shards:
            missing.append(f"{KNOWLEDGE_DATA_DIR}/*.parquet")
        if missing:
            raise FileNotFoundError(
                f"{folder} is not a REAVL knowledge index: missing {', '.join(missing)}. Build one with "
                f"`{REBUILD_COMMAND}`"
            )
        knowledge_config = json.loads(config_path.read_text(encoding="utf-8"))
        version = knowledge_config.get("format_version")
        if not isinstance(version, int) or version > KNOWLEDGE_FORMAT_VERSION:
            raise KnowledgeIndexError(
                f"{config_path} has format_version {version!r}, but this code reads knowledge index format versions "
                f"up to {KNOWLEDGE_FORMAT_VERSION}: upgrade REAVL (or its remote code) or rebuild the index with "
                f"`{REBUILD_COMMAND}`"
            )
        schema_names = pq.read_schema(shards[0]).names
        columns = [name for name in (*METADATA_COLUMNS, "input_ids") if name in schema_names]
        entries = pa.concat_tables([pq.read_table(shard, columns=columns) for shard in shards])
        index = _read_faiss_index(index_path, knowledge_config.get("index_factory", ""), mmap)
        return cls(entries, index, knowledge_config, embeddings=None, source_dir=folder)

    def _index_to_write(self):
        """The index to write to a new file. faiss writes memory-mapped IVF lists (`OnDiskInvertedLists`) as a
        reference to the file they map, which `save` may be about to replace: write a full copy read from it."""
        faiss = _import_faiss()
        ivf = _extract_ivf(self.index)
        if ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists):
            return faiss.read_index(str(self.source_dir / KNOWLEDGE_INDEX_NAME))
        return self.index

    def _check_consistent(self) -> None:
        where = f" in {self.source_dir}" if self.source_dir is not None else ""
        problems = []
        num_rows = self._entries.num_rows
        if self.config.get("num_rows") != num_rows:
            problems.append(f"{KNOWLEDGE_CONFIG_NAME} says {self.config.get('num_rows')} rows but the dataset has "
                            f"{num_rows}")
        if self.index.ntotal != num_rows:
            problems.append(f"{KNOWLEDGE_INDEX_NAME} holds {self.index.ntotal} vectors but the dataset has "
                            f"{num_rows} rows (faiss row i must be dataset row i)")
        if self.index.d != self.config.get("dim"):
            problems.append(f"{KNOWLEDGE_INDEX_NAME} has dimension {self.index.d} but {KNOWLEDGE_CONFIG_NAME} says "
                            f"dim {self.config.get('dim')}")
        if problems:
            raise KnowledgeIndexError(
                f"inconsistent knowledge index{where}: " + "; ".join(problems) + f". Rebuild it with "
                f"`{REBUILD_COMMAND}`"
            )

    # ---- properties ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._entries.num_rows

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rows={len(self)}, dim={self.dim}, index_factory={self.index_factory!r}, "
                f"fingerprint={self.fingerprint!r})")

    @property
    def dim(self) -> int:
        """Size of the retrieval keys (the model's `config.retrieval_dim`)."""
        return int(self.config["dim"])

    @property
    def fingerprint(self) -> str:
        """`knowledge_encoder_fingerprint()` of the model whose knowledge encoder embedded the index."""
        return str(self.config.get("encoder_fingerprint", ""))

    @property
    def index_factory(self) -> str:
        return str(self.config.get("index_factory", ""))

    @property
    def pad_token_id(self) -> int:
        return int(self.config.get("pad_token_id", 0))

    @property
    def ids(self) -> list[str]:
        """Entry ids in row order."""
        return self._ids_array.tolist()

    @property
    def titles(self) -> list[str]:
        """Entry titles in row order."""
        return self._titles_array.tolist()

    @property
    def embeddings(self) -> np.ndarray:
        """`(num_rows, dim)` float32 vectors the index was built from (read from the Parquet shards on first use)."""
        if self._embeddings is None:
            self._embeddings = self._read_embeddings()
        return self._embeddings

    def _read_embeddings(self) -> np.ndarray:
        import pyarrow.parquet as pq

        if self.source_dir is None:
            raise KnowledgeIndexError("this retriever holds no embeddings and was not read from a folder")
        pieces = []
        for shard in _shard_paths(self.source_dir):
            column = pq.read_table(shard, columns=["embedding"]).column("embedding").combine_chunks()
            pieces.append(column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False))
        embeddings = np.concatenate(pieces).reshape(-1, self.dim)
        if embeddings.shape[0] != len(self):
            raise KnowledgeIndexError(
                f"{self.source_dir}: the embedding column has {embeddings.shape[0]} rows but the dataset has "
                f"{len(self)}; rebuild it with `{REBUILD_COMMAND}`"
            )
        return embeddings

    def index_of(self, entry_id: str) -> int:
        """Row number of the entry with id `entry_id` (raises `KeyError` naming it when absent)."""
        if self._row_of_id is None:
            self._row_of_id = {entry_id: row for row, entry_id in enumerate(self._ids_array.tolist())}
        try:
            return self._row_of_id[entry_id]
        except KeyError:
            raise KeyError(f"no knowledge entry with id {entry_id!r} in this index ({len(self)} entries)") from None

    def token_ids(self, rows: Sequence[int] | np.ndarray | None = None) -> list[np.ndarray]:
        """Unpadded token ids of `rows` (all rows when `None`), e.g. to re-embed a shard with
        `embed_knowledge_entries` during an index refresh."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        starts, ends = self._token_offsets[rows], self._token_offsets[rows + 1]
        return [self._token_values[start:end] for start, end in zip(starts.tolist(), ends.tolist())]

    # ---- retrieval -----------------------------------------------------------------------------------------------

    def _as_queries(self, query_embeddings) -> np.ndarray:
        if isinstance(query_embeddings, torch.Tensor):
            query_embeddings = query_embeddings.detach().to("cpu", torch.float32).numpy()
        queries = np.ascontiguousarray(query_embeddings, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"query_embeddings must have shape (batch, {self.dim}) for this index, got {tuple(queries.shape)}"
            )
        return queries

    def search(self, query_embeddings, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One batched faiss search: `(scores, rows)`, both `(batch, k)`; rows faiss could not fill are -1."""
        if not 0 < k <= len(self):
            raise ValueError(f"k must be between 1 and the number of entries ({len(self)}), got {k}")
        queries = self._as_queries(query_embeddings)
        with _blas_for(queries.shape[0]):
            scores, rows = self.index.search(queries, k)
        return scores, rows

    def get_entries(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded token ids and attention mask of arbitrary rows.

        Args:
            indices: row numbers of any shape `S`, e.g. `(batch, k)`; -1 marks an empty slot.

        Returns:
            `(input_ids, attention_mask)`, LongTensors of shape `S + (length,)`, `length` the longest entry among
            `indices` (at least 1); padding is `pad_token_id` with mask 0, an empty slot is all padding.
        """
        rows = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        if rows.size and rows.max() >= len(self):
            raise IndexError(f"row {int(rows.max())} is out of range for an index of {len(self)} entries")
        valid = rows >= 0
        safe_rows = np.where(valid, rows, 0)
        starts = self._token_offsets[safe_rows]
        lengths = np.where(valid, self._token_offsets[safe_rows + 1] - starts, 0)
        length = max(int(lengths.max(initial=0)), 1)
        positions = np.arange(length)
        attention_mask = positions < lengths[..., None]
        gather = np.where(attention_mask, starts[..., None] + positions, 0)
        values = self._token_values if self._token_values.size else np.zeros(1, np.int32)
        input_ids = np.where(attention_mask, values[gather], self.pad_token_id)
        return torch.from_numpy(input_ids.astype(np.int64)), torch.from_numpy(attention_mask.astype(np.int64))

    def retrieve(self, query_embeddings, k: int) -> BatchEncoding:
        """Top-`k` entries for a batch of queries, in one faiss call.

        Args:
            query_embeddings: `(batch, dim)` tensor or array (the model's `get_query_embeddings`).
            k: entries per query.

        Returns:
            A `BatchEncoding` with `knowledge_input_ids` and `knowledge_attention_mask` `(batch, k, length)`
            LongTensors padded to the longest retrieved entry, `knowledge_scores` `(batch, k)` float32 inner
            products (best first), `knowledge_indices` `(batch, k)` LongTensor row numbers, and for display `ids`
            and `titles` (`list[list[str]]`). Slots faiss cannot fill (an IVF index probing too few lists) have row
            -1, score -inf, an empty title and no tokens.
        """
        scores, rows = self.search(query_embeddings, k)
        input_ids, attention_mask = self.get_entries(rows)
        valid = rows >= 0
        safe_rows = np.where(valid, rows, 0)
        ids = np.where(valid, self._ids_array[safe_rows], "").tolist()
        titles = np.where(valid, self._titles_array[safe_rows], "").tolist()
        return BatchEncoding(
            {
                "knowledge_input_ids": input_ids,
                "knowledge_attention_mask": attention_mask,
                "knowledge_scores": torch.from_numpy(np.where(valid, scores, -np.inf).astype(np.float32)),
                "knowledge_indices": torch.from_numpy(rows.astype(np.int64)),
                "ids": ids,
                "titles": titles,
            }
        )

    # ---- compatibility and refresh ---------------------------------------------------------------------------------

    def check_compatible(self, model) -> None:
        """Raise `ValueError` naming every mismatch between this index and `model` (a `ReavlModel` or a task model
        holding one at `.reavl`): row count vs dataset, `dim` vs `config.retrieval_dim`, encoder fingerprint vs
        `model.knowledge_encoder_fingerprint()`."""
        base = getattr(model, "reavl", model)
        problems = []
        if self.index.ntotal != len(self):
            problems.append(f"row count: the faiss index holds {self.index.ntotal} vectors but the dataset has "
                            f"{len(self)} rows")
        expected_dim = base.config.retrieval_dim
        if self.dim != expected_dim:
            problems.append(f"dimension: the index has dim {self.dim} but the model's config.retrieval_dim is "
                            f"{expected_dim}")
        model_fingerprint = base.knowledge_encoder_fingerprint()
        if self.fingerprint != model_fingerprint:
            problems.append(
                f"encoder fingerprint: the index was embedded by a knowledge encoder with fingerprint "
                f"{self.fingerprint!r} but this model's is {model_fingerprint!r} (other weights: its keys would live "
                f"in another space than the queries)"
            )
        if problems:
            where = f" at {self.source_dir}" if self.source_dir is not None else ""
            raise KnowledgeIndexError(
                f"knowledge index{where} does not match the model: " + "; ".join(problems) + ". Rebuild it with "
                f"`{REBUILD_COMMAND}` (or, during pre-training, refresh it with update_embeddings)"
            )

    def update_embeddings(self, embeddings: np.ndarray, fingerprint: str) -> None:
        """Replace every vector `(num_rows, dim)` and rebuild the faiss index in memory with the same factory (the
        ANCE-style refresh of pre-training); `fingerprint` is the new encoder's. `save` writes the result."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(self):
            raise ValueError(
                f"update_embeddings needs one vector per entry, shape ({len(self)}, dim); got {embeddings.shape}"
            )
        self.index, factory = build_faiss_index(embeddings, self.index_factory or "Flat")
        self._embeddings = embeddings
        self.config.update(dim=int(embeddings.shape[1]), index_factory=factory, encoder_fingerprint=str(fingerprint))
        self.is_modified = True

    # ---- saving --------------------------------------------------------------------------------------------------

    def save(self, output_dir: str | os.PathLike, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> Path:
        """Write the index folder (layout in the module docstring) atomically: into a staging folder beside
        `output_dir`, renamed over it at the end, so a failure leaves a previous index intact. Returns the folder."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        faiss = _import_faiss()
        # Read everything first: output_dir may be the folder this retriever was loaded from.
        embeddings = self.embeddings
        index = self._index_to_write()
        input_ids = pa.ListArray.from_arrays(
            pa.array(self._token_offsets.astype(np.int32)), pa.array(self._token_values, pa.int32())
        ) if self._token_offsets[-1] < 2**31 else pa.LargeListArray.from_arrays(
            pa.array(self._token_offsets), pa.array(self._token_values, pa.int32())
        )
        embedding_column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), self.dim)
        table = self._entries.append_column("input_ids", input_ids).append_column("embedding", embedding_column)
        knowledge_config = {**self.config, "format_version": KNOWLEDGE_FORMAT_VERSION, "num_rows": len(self)}
        num_shards = max(1, math.ceil(len(self) / rows_per_shard))
        with atomic_directory(output_dir) as staging:
            (staging / KNOWLEDGE_DATA_DIR).mkdir()
            for shard in range(num_shards):
                piece = table.slice(shard * rows_per_shard, rows_per_shard)
                pq.write_table(piece, staging / KNOWLEDGE_DATA_DIR / f"train-{shard:05d}-of-{num_shards:05d}.parquet")
            faiss.write_index(index, str(staging / KNOWLEDGE_INDEX_NAME))
            (staging / KNOWLEDGE_CONFIG_NAME).write_text(json.dumps(knowledge_config, indent=2) + "\n", "utf-8")
            (staging / KNOWLEDGE_CARD_NAME).write_text(_dataset_card(knowledge_config), "utf-8")
        self.config = knowledge_config
        self.source_dir, self.is_modified = Path(output_dir), False
        return Path(output_dir)


__all__ = [
    "KNOWLEDGE_FORMAT_VERSION",
    "KnowledgeIndexError",
    "ReavlRetriever",
    "atomic_directory",
    "build_faiss_index",
    "resolve_index_factory",
]
