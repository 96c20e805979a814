"""Knowledge bases: one schema, loaders for common formats, validation, and entry text.

A knowledge base (KB) is a :class:`datasets.Dataset` with these columns:

==========  ===========================  ==========================================
column      type                         meaning
==========  ===========================  ==========================================
``id``      ``str``                      stable entry id (e.g. a Wikidata QID)
``title``   ``str``                      entry name
``text``    ``str``                      description / passage (never empty)
``aliases`` ``list[str]``                other names (may be empty)
``triples`` ``list[[relation, tail]]``   facts, each a pair of str (may be empty)
``image``   ``str | None``               path of an image of the entry
==========  ===========================  ==========================================

``id``, ``title`` and ``text`` are required; the other columns get defaults
(``[]``, ``[]``, ``None``) when a source lacks them. Extra columns are kept, so
a loader may carry fields that are useful elsewhere (e.g. Wikipedia
``description`` as a retrieval query).

Loaders (:func:`load_knowledge_base`) accept JSON lines, Parquet, CSV, saved or
in-memory ``datasets.Dataset``, lists of dicts, and three public formats:
WikiMEL's ``qid2ne.json``/``qid2abs.json``, SimpleQuestions-over-Wikidata triple
TSVs, and Wikipedia summaries JSON. Every loader ends in
:func:`validate_knowledge_base`.

:func:`entry_to_text` defines the single string an entry is encoded from.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import datasets
import pyarrow as pa
from datasets import Features, List, Value

logger = logging.getLogger(__name__)

__all__ = [
    "KNOWLEDGE_COLUMNS",
    "KNOWLEDGE_FEATURES",
    "KNOWLEDGE_FORMATS",
    "REQUIRED_COLUMNS",
    "KnowledgeBaseError",
    "UnknownTripleTailWarning",
    "entry_to_text",
    "format_triples",
    "id_to_title_map",
    "load_knowledge_base",
    "validate_knowledge_base",
]

KNOWLEDGE_COLUMNS: tuple[str, ...] = ("id", "title", "text", "aliases", "triples", "image")
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "title", "text")

KNOWLEDGE_FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "text": Value("string"),
        "aliases": List(Value("string")),
        "triples": List(List(Value("string"))),
        "image": Value("string"),
    }
)

KNOWLEDGE_FORMATS: tuple[str, ...] = (
    "jsonl",
    "parquet",
    "csv",
    "dataset",
    "records",
    "wikimel",
    "wikidata-triples",
    "wikipedia-summaries",
)

# How many offending ids/rows an error or warning message lists before "... and N more".
_MAX_LISTED = 20


class KnowledgeBaseError(ValueError):
    """A knowledge base source cannot be read or breaks the schema."""


class UnknownTripleTailWarning(UserWarning):
    """Some triples point at ids that are not entries of the knowledge base."""


# --------------------------------------------------------------------------------------
# Entry text
# --------------------------------------------------------------------------------------


def format_triples(
    triples: Iterable[Sequence[str]],
    id_to_title: Mapping[str, str] | None = None,
    max_triples: int | None = 8,
    relation_to_label: Mapping[str, str] | None = None,
) -> str:
    """Render triples as ``"relation: tail; relation: tail"`` (no final period).

    Tails are shown by title when ``id_to_title`` knows them, otherwise by id;
    relations by ``relation_to_label`` when given. Only the first
    ``max_triples`` well-formed pairs are rendered (``None`` = all).
    """
    id_to_title = id_to_title or {}
    relation_to_label = relation_to_label or {}
    facts = []
    for triple in triples or ():
        if max_triples is not None and len(facts) >= max_triples:
            break
        if len(triple) != 2:
            continue
        relation, tail = triple
        facts.append(f"{relation_to_label.get(relation, relation)}: {id_to_title.get(tail, tail)}")
    return "; ".join(facts)


def entry_to_text(
    title: str | None,
    text: str | None,
    triples: Iterable[Sequence[str]] = (),
    id_to_title: Mapping[str, str] | None = None,
    max_triples: int = 8,
    relation_to_label: Mapping[str, str] | None = None,
) -> str:
    """The one string a knowledge entry is encoded from.

    Format: ``"{title}. {text} {relation}: {tail}; {relation}: {tail}."``

    * The title gets a closing ``.`` unless it already ends in ``.``, ``!`` or ``?``.
    * The text is left out when it is empty or repeats the title (case-insensitive).
    * Up to ``max_triples`` facts follow, rendered by :func:`format_triples`
      (tails by title via ``id_to_title``); they are left out when the text
      already contains them verbatim, as texts generated from triples do
      (the ``wikidata-triples`` loader).

    Example::

        >>> entry_to_text("Ada Lovelace", "English mathematician.", [["P106", "Q1"]], {"Q1": "writer"})
        'Ada Lovelace. English mathematician. P106: writer.'

    Pure function of its arguments, so the same KB always encodes to the same strings.
    """
    title = (title or "").strip()
    text = (text or "").strip()
    parts = []
    if title:
        parts.append(title if title[-1] in ".!?" else title + ".")
    if text and text.casefold() != title.casefold():
        parts.append(text)
    facts = format_triples(triples, id_to_title, max_triples, relation_to_label) if max_triples > 0 else ""
    if facts and facts not in text:
        parts.append(facts + ".")
    return " ".join(parts)


def id_to_title_map(knowledge_base: datasets.Dataset) -> dict[str, str]:
    """``{id: title}`` for a KB, e.g. the ``id_to_title`` argument of :func:`entry_to_text`."""
    table = knowledge_base.with_format("arrow")
    return dict(zip(table["id"].to_pylist(), table["title"].to_pylist()))


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _listed(items: Sequence[str]) -> str:
    """First ``_MAX_LISTED`` items joined, with a count of the rest."""
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... and {len(items) - _MAX_LISTED} more"
    return shown


def _check_required_columns(column_names: Sequence[str]) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in column_names]
    if missing:
        raise KnowledgeBaseError(
            f"knowledge base is missing required column(s) {missing}; "
            f"columns present: {list(column_names)}. Required: {list(REQUIRED_COLUMNS)}."
        )


def validate_knowledge_base(knowledge_base: datasets.Dataset) -> datasets.Dataset:
    """Check a KB against the schema and return it unchanged.

    Raises :class:`KnowledgeBaseError` (one message listing every problem) for:
    missing ``id``/``title``/``text`` columns; empty or missing ids, titles or
    texts (rows and ids named); duplicated ids (ids and their rows named);
    triples that are not ``[relation, tail]`` pairs. Row numbers are 0-based.

    Triples whose tail is not an id of the KB are allowed (a KB is often a
    slice of a bigger graph) but reported with an :class:`UnknownTripleTailWarning`.

    Reads whole columns through Arrow, so 20k rows take milliseconds.
    """
    _check_required_columns(knowledge_base.column_names)
    # Arrow columns respect select()/shuffle() index mappings and avoid per-row Python objects.
    table = knowledge_base.with_format("arrow")
    ids = table["id"].to_pylist()
    problems = []

    for column in REQUIRED_COLUMNS:
        values = ids if column == "id" else table[column].to_pylist()
        empty_rows = [row for row, value in enumerate(values) if value is None or not str(value).strip()]
        if empty_rows:
            described = [f"row {row} (id {ids[row]!r})" for row in empty_rows]
            problems.append(f"{len(empty_rows)} row(s) have an empty {column!r}: {_listed(described)}")

    counts = Counter(ids)
    duplicated = {entry_id for entry_id, count in counts.items() if count > 1 and entry_id is not None}
    if duplicated:
        rows_of: dict[str, list[int]] = defaultdict(list)
        for row, entry_id in enumerate(ids):
            if entry_id in duplicated:
                rows_of[entry_id].append(row)
        described = [f"{entry_id!r} at rows {rows}" for entry_id, rows in rows_of.items()]
        problems.append(
            f"{len(duplicated)} duplicated id(s) in {sum(len(r) for r in rows_of.values())} rows: {_listed(described)}"
        )

    if "triples" in knowledge_base.column_names:
        known_ids = set(ids)
        malformed, unknown = [], []
        entries_with_unknown = 0
        for row, triples in enumerate(table["triples"].to_pylist()):
            row_has_unknown = False
            for triple in triples or ():
                if not isinstance(triple, (list, tuple)) or len(triple) != 2 or None in triple:
                    malformed.append(f"row {row} (id {ids[row]!r}): {triple!r}")
                elif triple[1] not in known_ids:
                    unknown.append(f"{ids[row]} -{triple[0]}-> {triple[1]}")
                    row_has_unknown = True
            entries_with_unknown += row_has_unknown
        if malformed:
            problems.append(f"{len(malformed)} triple(s) are not [relation, tail] pairs: {_listed(malformed)}")
        if unknown:
            message = (
                f"{len(unknown)} triple(s) in {entries_with_unknown} entries point at ids that are not in the "
                f"knowledge base, e.g. {', '.join(unknown[:5])}; they are kept and shown by raw id"
            )
            warnings.warn(message, UnknownTripleTailWarning, stacklevel=2)

    if problems:
        raise KnowledgeBaseError(
            f"invalid knowledge base ({knowledge_base.num_rows} rows):\n- " + "\n- ".join(problems)
        )
    return knowledge_base


# --------------------------------------------------------------------------------------
# Column normalisation shared by the loaders
# --------------------------------------------------------------------------------------


def _as_optional_str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _as_aliases(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [str(alias) for alias in value if alias is not None and str(alias).strip()]


def _as_triples(value: Any) -> list[list[str]]:
    if value is None:
        return []
    # Keep wrong-length triples as they are so that validation can name the row.
    return [[_as_optional_str(part) for part in triple] for triple in value]


def _as_image(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


_NORMALISERS: dict[str, Callable[[Any], Any]] = {
    "id": _as_optional_str,
    "title": _as_optional_str,
    "text": _as_optional_str,
    "aliases": _as_aliases,
    "triples": _as_triples,
    "image": _as_image,
}


def _records_to_columns(records: Iterable[Mapping[str, Any]]) -> dict[str, list]:
    """Row dicts to column lists; a key missing from some rows becomes None there."""
    records = list(records)
    names: dict[str, None] = {}
    for record in records:
        if not isinstance(record, Mapping):
            raise KnowledgeBaseError(f"knowledge records must be dicts, got {type(record).__name__}")
        names.update(dict.fromkeys(record))
    return {name: [record.get(name) for record in records] for name in names}


def _columns_to_dataset(columns: dict[str, list], normalise: bool = True) -> datasets.Dataset:
    """Build the KB dataset: schema columns typed (and normalised), extra columns type-inferred.

    ``normalise=False`` skips the per-value clean-up for loaders that already
    produce clean Python values (the public-format loaders), which halves their time.
    """
    _check_required_columns(list(columns))
    num_rows = len(columns["id"])
    defaults = {"aliases": lambda: [], "triples": lambda: [], "image": lambda: None}
    arrow_schema = KNOWLEDGE_FEATURES.arrow_schema
    mapping: dict[str, pa.Array] = {}
    for name in KNOWLEDGE_COLUMNS:
        if name in columns:
            values = [_NORMALISERS[name](value) for value in columns[name]] if normalise else columns[name]
        else:
            values = [defaults[name]() for _ in range(num_rows)]
        try:
            # Typed Arrow arrays: Dataset.from_dict would otherwise encode every value in Python.
            mapping[name] = pa.array(values, type=arrow_schema.field(name).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise KnowledgeBaseError(
                f"column {name!r} does not fit type {KNOWLEDGE_FEATURES[name]}: {error}"
            ) from error
    for name, values in columns.items():
        if name not in mapping:
            try:
                mapping[name] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
                raise KnowledgeBaseError(f"extra column {name!r} has mixed value types: {error}") from error
    return datasets.Dataset.from_dict(mapping)


def _conform_dataset(knowledge_base: datasets.Dataset) -> datasets.Dataset:
    """Add missing optional columns to an existing Dataset and cast schema columns to their types."""
    _check_required_columns(knowledge_base.column_names)
    num_rows = knowledge_base.num_rows
    defaults = {"aliases": lambda: [], "triples": lambda: [], "image": lambda: None}
    for name, make_default in defaults.items():
        if name not in knowledge_base.column_names:
            knowledge_base = knowledge_base.add_column(
                name, [make_default() for _ in range(num_rows)], feature=KNOWLEDGE_FEATURES[name]
            )
    for name in KNOWLEDGE_COLUMNS:
        if knowledge_base.features[name] != KNOWLEDGE_FEATURES[name]:
            try:
                knowledge_base = knowledge_base.cast_column(name, KNOWLEDGE_FEATURES[name])
            except (ValueError, TypeError, pa.ArrowInvalid) as error:
                raise KnowledgeBaseError(
                    f"column {name!r} has type {knowledge_base.features[name]}, which does not cast to "
                    f"{KNOWLEDGE_FEATURES[name]}: {error}"
                ) from error
    return knowledge_base


# --------------------------------------------------------------------------------------
# Generic loaders
# --------------------------------------------------------------------------------------


def _load_records(source: Iterable[Mapping[str, Any]]) -> datasets.Dataset:
    return _columns_to_dataset(_records_to_columns(source))


def _load_dataset(source: datasets.Dataset | str | Path) -> datasets.Dataset:
    if not isinstance(source, datasets.Dataset):
        loaded = datasets.load_from_disk(str(source))
        if not isinstance(loaded, datasets.Dataset):
            raise KnowledgeBaseError(
                f"{source} holds a {type(loaded).__name__} with splits {list(loaded)}; "
                "pass one split as a Dataset (e.g. load_knowledge_base(dataset_dict['train']))"
            )
        source = loaded
    return _conform_dataset(source)


def _load_jsonl(source: str | Path) -> datasets.Dataset:
    """JSON lines; a ``.json`` file holding one JSON array of records is accepted too."""
    path = Path(source)
    content = path.read_text(encoding="utf-8")
    if content.lstrip().startswith("["):
        records = json.loads(content)
    else:
        records = []
        for line_number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise KnowledgeBaseError(
                    f"{path} line {line_number} is not a JSON object ({error}). JSON lines need one entry "
                    "per line; for WikiMEL or Wikipedia-summary dictionaries pass format='wikimel' or "
                    "format='wikipedia-summaries'."
                ) from error
            if not isinstance(record, dict):
                raise KnowledgeBaseError(f"{path} line {line_number} is a {type(record).__name__}, not an object")
            records.append(record)
    return _load_records(records)


def _load_parquet(source: str | Path) -> datasets.Dataset:
    import pyarrow.parquet as pq

    # pyarrow directly: Dataset.from_parquet would copy the file into the datasets cache.
    return _columns_to_dataset(pq.read_table(str(source)).to_pydict())


def _load_csv(source: str | Path, alias_separator: str = "|", delimiter: str = ",") -> datasets.Dataset:
    """CSV with a header row; ``aliases`` split on ``alias_separator``, ``triples`` a JSON string."""
    path = Path(source)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter=delimiter))
    for row_number, row in enumerate(rows):
        if row.get("aliases") is not None:
            row["aliases"] = [alias.strip() for alias in row["aliases"].split(alias_separator) if alias.strip()]
        if row.get("triples") is not None:
            cell = row["triples"].strip()
            try:
                row["triples"] = json.loads(cell) if cell else []
            except json.JSONDecodeError as error:
                raise KnowledgeBaseError(
                    f"{path} row {row_number} (id {row.get('id')!r}): 'triples' must be a JSON list of "
                    f'[relation, tail] pairs like [["P31", "Q5"]], got {cell[:80]!r}'
                ) from error
    return _load_records(rows)


# --------------------------------------------------------------------------------------
# Public formats
# --------------------------------------------------------------------------------------


def _load_wikimel(source: str | Path) -> datasets.Dataset:
    """WikiMEL entity files: ``qid2ne.json`` gives id -> name, ``qid2abs.json`` id -> description.

    Every QID of ``qid2ne.json`` becomes one entry (``id``=QID, ``title``=name,
    ``text``=description). A QID without a description gets its name as text
    (counted in a warning); descriptions of QIDs without a name are ignored.
    """
    folder = Path(source)
    if folder.is_file():
        folder = folder.parent
    names = json.loads((folder / "qid2ne.json").read_text(encoding="utf-8"))
    abstracts_path = folder / "qid2abs.json"
    abstracts = json.loads(abstracts_path.read_text(encoding="utf-8")) if abstracts_path.exists() else {}
    texts, without_text = [], 0
    for qid, name in names.items():
        abstract = abstracts.get(qid)
        if not abstract or not str(abstract).strip():
            abstract, without_text = name, without_text + 1
        texts.append(abstract)
    if without_text:
        warnings.warn(f"{without_text} WikiMEL entities have no description in {abstracts_path}; "
                      "their name is used as text", stacklevel=3)
    nameless = len(set(abstracts) - set(names))
    if nameless:
        logger.info("%d descriptions in %s have no name in qid2ne.json and were skipped", nameless, abstracts_path)
    return _columns_to_dataset(
        {"id": list(names), "title": [str(name) for name in names.values()], "text": texts}, normalise=False
    )


def _inverse_relation(relation: str) -> str:
    """SimpleQuestions writes the inverse of property ``P<n>`` as ``R<n>``."""
    if relation[:1] == "P":
        return "R" + relation[1:]
    if relation[:1] == "R":
        return "P" + relation[1:]
    return "inverse:" + relation


def _load_wikidata_triples(
    source: str | Path,
    names: Mapping[str, str] | None = None,
    add_inverse: bool = True,
    max_text_triples: int = 16,
    relation_to_label: Mapping[str, str] | None = None,
) -> datasets.Dataset:
    """Entries from ``subject<TAB>property<TAB>object<TAB>question`` lines (SimpleQuestions over Wikidata).

    ``source`` is one file or a folder whose ``*.txt``/``*.tsv`` files are all
    read (sorted by name). What is built:

    * one entry per id seen as subject or object, in order of first appearance;
    * the subject gets the triple ``[property, object]`` as written (``R<n>`` is
      the inverse of ``P<n>``); with ``add_inverse`` the object also gets
      ``[inverse property, subject]``, so objects are entries with facts rather
      than bare ids and every tail is a KB id. Repeated facts are kept once;
    * ``title``: ``names[id]`` when given (e.g. ``id_to_title_map(wikimel_kb)``),
      else the id itself, since the files hold no names;
    * ``text``: the entry's first ``max_text_triples`` facts rendered by
      :func:`format_triples` with the same names, ending in ``.`` (e.g.
      ``"P19: Q1524; P106: Q82955."``), or the title for an entry with no facts
      (an object when ``add_inverse`` is off). :func:`entry_to_text` does not
      repeat facts already in the text;
    * extra column ``questions``: the natural-language questions whose topic
      entity (the file's subject) is this entry, useful as retrieval queries.
    """
    path = Path(source)
    files = sorted([*path.glob("*.txt"), *path.glob("*.tsv")]) if path.is_dir() else [path]
    if not files:
        raise KnowledgeBaseError(f"no *.txt or *.tsv triple files in {path}")
    names = names or {}
    triples_of: dict[str, dict[tuple[str, str], None]] = {}  # dicts as ordered sets
    questions_of: dict[str, list[str]] = {}

    def entry(entity_id: str) -> dict[tuple[str, str], None]:
        if entity_id not in triples_of:
            triples_of[entity_id] = {}
            questions_of[entity_id] = []
        return triples_of[entity_id]

    for file in files:
        with file.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 3:
                    raise KnowledgeBaseError(
                        f"{file} line {line_number}: expected subject<TAB>property<TAB>object[<TAB>question], "
                        f"got {len(fields)} field(s): {line[:80]!r}"
                    )
                subject, relation, obj = (field.strip() for field in fields[:3])
                entry(subject)[(relation, obj)] = None
                entry(obj)
                if add_inverse:
                    triples_of[obj][(_inverse_relation(relation), subject)] = None
                if len(fields) > 3 and fields[3].strip():
                    questions_of[subject].append(fields[3].strip())

    ids = list(triples_of)
    triples = [[list(pair) for pair in triples_of[entity_id]] for entity_id in ids]
    titles = [names.get(entity_id, entity_id) for entity_id in ids]
    texts = []
    for title, entity_triples in zip(titles, triples):
        facts = format_triples(entity_triples, names, max_text_triples, relation_to_label)
        texts.append(facts + "." if facts else title)
    return _columns_to_dataset(
        {
            "id": ids,
            "title": titles,
            "text": texts,
            "triples": triples,
            "questions": [questions_of[entity_id] for entity_id in ids],
        },
        normalise=False,
    )


def _load_wikipedia_summaries(source: str | Path) -> datasets.Dataset:
    """``{title: {title, extract, description, topic}}`` JSON (e.g. ``summaries_en-us.json``).

    ``source`` is the file or a folder holding exactly one ``summaries_*.json``.
    ``id`` and ``title`` are the article title (stable across dumps), ``text``
    the lead paragraph (``extract``); ``description`` (a short Wikidata
    description) and ``topic`` are kept as extra columns. An article with no
    extract falls back to its description (counted in a warning).
    """
    path = Path(source)
    if path.is_dir():
        candidates = sorted(path.glob("summaries_*.json"))
        if len(candidates) != 1:
            raise KnowledgeBaseError(
                f"expected one summaries_*.json in {path}, found {[c.name for c in candidates]}; pass the file"
            )
        path = candidates[0]
    articles = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(articles, dict):
        raise KnowledgeBaseError(f"{path} must hold a JSON object {{title: article}}, got {type(articles).__name__}")
    columns: dict[str, list] = {"id": [], "title": [], "text": [], "description": [], "topic": []}
    without_extract = 0
    for key, article in articles.items():
        description = article.get("description") or None
        text = article.get("extract")
        if not text or not text.strip():
            text, without_extract = description, without_extract + 1
        columns["id"].append(key)
        columns["title"].append(article.get("title") or key)
        columns["text"].append(text)
        columns["description"].append(description)
        columns["topic"].append(article.get("topic") or None)
    if without_extract:
        warnings.warn(f"{without_extract} Wikipedia articles in {path} have no extract; "
                      "their description is used as text", stacklevel=3)
    return _columns_to_dataset(columns, normalise=False)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[..., datasets.Dataset]] = {
    "jsonl": _load_jsonl,
    "parquet": _load_parquet,
    "csv": _load_csv,
    "dataset": _load_dataset,
    "records": _load_records,
    "wikimel": _load_wikimel,
    "wikidata-triples": _load_wikidata_triples,
    "wikipedia-summaries": _load_wikipedia_summaries,
}

_OPTIONS: dict[str, tuple[str, ...]] = {
    "csv": ("alias_separator", "delimiter"),
    "wikidata-triples": ("names", "add_inverse", "max_text_triples", "relation_to_label"),
}

_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "wikidata-triples",
    ".txt": "wikidata-triples",
}


def _infer_format(source: Any) -> str:
    if isinstance(source, datasets.Dataset):
        return "dataset"
    if not isinstance(source, (str, Path)) and isinstance(source, Iterable):
        return "records"  # list of dicts, or any iterable of them
    if not isinstance(source, (str, Path)):
        raise KnowledgeBaseError(
            f"cannot read a knowledge base from a {type(source).__name__}; pass a path, a datasets.Dataset "
            "or a list of dicts"
        )
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"knowledge base source {path} does not exist")
    if path.is_dir():
        if (path / "qid2ne.json").exists():
            return "wikimel"
        if (path / "state.json").exists() or (path / "dataset_info.json").exists():
            return "dataset"
        if any(path.glob("summaries_*.json")):
            return "wikipedia-summaries"
        if any(path.glob("*.tsv")) or any(path.glob("*.txt")):
            return "wikidata-triples"
        raise KnowledgeBaseError(f"cannot tell the knowledge base format of folder {path}; pass format= "
                                 f"one of {list(KNOWLEDGE_FORMATS)}")
    if path.name == "qid2ne.json":
        return "wikimel"
    if path.suffix.lower() in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[path.suffix.lower()]
    raise KnowledgeBaseError(f"cannot tell the knowledge base format of {path} from its suffix; pass format= "
                             f"one of {list(KNOWLEDGE_FORMATS)}")


def load_knowledge_base(source: Any, format: str | None = None, **options: Any) -> datasets.Dataset:
    """Load a knowledge base from ``source`` into the KB schema and validate it.

    Args:
        source: a path (file or folder), a :class:`datasets.Dataset`, or a list
            (any iterable) of dicts.
        format: one of :data:`KNOWLEDGE_FORMATS`; inferred when ``None`` from the
            object type, the file suffix (``.jsonl``/``.json``, ``.parquet``,
            ``.csv``, ``.tsv``/``.txt``) or a folder's files (``qid2ne.json`` ->
            wikimel, ``summaries_*.json`` -> wikipedia-summaries, a saved dataset
            -> dataset, ``*.txt``/``*.tsv`` -> wikidata-triples).
        **options: format options: csv ``alias_separator="|"``, ``delimiter=","``;
            wikidata-triples ``names``, ``add_inverse=True``, ``max_text_triples=16``,
            ``relation_to_label``.

    Returns:
        A Dataset with :data:`KNOWLEDGE_COLUMNS` (typed as :data:`KNOWLEDGE_FEATURES`)
        plus any extra columns of the source.

    Raises:
        KnowledgeBaseError: unknown format or option, unreadable content, or a
            schema violation (see :func:`validate_knowledge_base`).
    """
    format = format or _infer_format(source)
    if format not in _LOADERS:
        raise KnowledgeBaseError(f"unknown knowledge base format {format!r}; choose one of {list(KNOWLEDGE_FORMATS)}")
    allowed = _OPTIONS.get(format, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise KnowledgeBaseError(
            f"format {format!r} takes no option(s) {unknown}; its options are {list(allowed) or 'none'}"
        )
    knowledge_base = _LOADERS[format](source, **options)
    return validate_knowledge_base(knowledge_base)
