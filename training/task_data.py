"""Downstream task data: readers for the public formats, one record schema per task, and the `Trainer` collators.

Readers turn a file (or folder) into a [`TaskDataset`] of plain dict records, validating every record and naming the
record id of anything wrong. Collators turn a list of records into the tensors the REAVL heads take, through the
`ReavlProcessor` (images + text), so the same code serves `reavl finetune` and `reavl evaluate`.

| task | reader | formats | record fields |
|---|---|---|---|
| `vqa` | [`read_vqa`] | OK-VQA (`sent`, `img_id`, `label` = `{answer: soft score}`), VQAv2 / A-OKVQA / the knowledge world (`question`, `answers` = human answers, `image` / `img_id` / `image_id`) | `id, image, question, answers, soft_labels` |
| `entity-linking` | [`read_entity_linking`] | WikiMEL folder (`samples.json` + `splits.json` + `images/`), JSONL (`id, image, sentence, mention, mention_span, entity_id`: the knowledge world) | `id, image, sentence, mention, mention_span, entity_id` |
| `retrieval` | [`read_captions`] | CSV `image,caption` (Flickr8k, the knowledge world) | `id, image, caption` |
| `classification` | [`read_classification`] | SNLI-VE JSONL (`Flickr30K_ID`, `sentence2`, `gold_label`), NLVR2 JSONL (`identifier`, `sentence`, `label`, `left_url`...), generic JSONL (`image`/`images`, `sentence`/`text`, `label`) | `id, images, text, label` |

Bad input: a record without answers / text / label, an entity id that is not in the knowledge base, an image that is
missing or cannot be decoded is reported with the record's id: `on_invalid="raise"` (default) raises one
`ValueError` listing every bad record (the first 20 ids), `on_invalid="skip"` logs the same list as a warning and
leaves those records out (`dataset.skipped` keeps `(id, reason)`). Never a silent wrong label.

Missing images: `missing_images="error"` (default, except WikiMEL) makes a missing image file a bad record;
`missing_images="placeholder"` keeps the record and gives it a blank mid-grey image. WikiMEL defaults to the
placeholder: only 45 of its 22,136 caption images were ever available offline, so WikiMEL entity linking here is
mostly text (mention + sentence) against the knowledge base, and the image stream sees the blank image. Such records
have `image=None`. An image that exists but cannot be decoded is always an error (never replaced by a blank).

Example:

```python
>>> from training.task_data import read_vqa, load_answer_vocabulary
>>> data = read_vqa("../shared/data/okvqa/train.json", missing_images="placeholder")
>>> vocabulary = load_answer_vocabulary("../shared/data/okvqa/trainval_ans2label.json")
>>> data[0]["soft_labels"]
{'pony tail': 1.0, 'braid': 0.667, 'ponytail': 0.667}
```
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from PIL import Image, UnidentifiedImageError


logger = logging.getLogger(__name__)

TASKS = ("vqa", "entity-linking", "retrieval", "classification")
FORMATS = {
    "vqa": ("okvqa", "vqa"),
    "entity-linking": ("wikimel", "jsonl"),
    "retrieval": ("captions",),
    "classification": ("snli-ve", "nlvr2", "jsonl"),
}
ON_INVALID_CHOICES = ("raise", "skip")
MISSING_IMAGE_CHOICES = ("error", "placeholder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PLACEHOLDER_COLOR = (127, 127, 127)
SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")
NLVR2_LABELS = ("False", "True")
_MAX_LISTED = 20


# --------------------------------------------------------------------------------------------------------------------
# Dataset container and validation bookkeeping
# --------------------------------------------------------------------------------------------------------------------


class TaskDataset(torch.utils.data.Dataset):
    """Records of one task (plain dicts, see the module docstring), with what the reader learnt about them.

    Attributes:
        task: one of `TASKS`.
        records: the valid records, in file order.
        source: the file or folder they were read from.
        format: the format the reader used.
        skipped: `(record id, reason)` of records left out with `on_invalid="skip"`.
        labels: class names of a classification dataset, position = class id (empty for other tasks).
    """

    def __init__(self, task: str, records: list[dict], source: str, format: str,
                 skipped: list[tuple[str, str]] | None = None, labels: Sequence[str] = ()):
        self.task = task
        self.records = records
        self.source = source
        self.format = format
        self.skipped = list(skipped or [])
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def select(self, count: int | None) -> "TaskDataset":
        """The first `count` records (all when `count` is None), e.g. for `max_train_samples`."""
        if count is None or count >= len(self.records):
            return self
        return TaskDataset(self.task, self.records[:count], self.source, self.format, self.skipped, self.labels)

    def __repr__(self) -> str:
        return (f"TaskDataset(task={self.task!r}, format={self.format!r}, records={len(self.records)}, "
                f"skipped={len(self.skipped)}, source={self.source!r})")


class _Problems:
    """Collects `(record id, reason)` of bad records and applies the `on_invalid` policy at the end."""

    def __init__(self, source: str, on_invalid: str):
        if on_invalid not in ON_INVALID_CHOICES:
            raise ValueError(f"on_invalid must be one of {ON_INVALID_CHOICES}, got {on_invalid!r}")
        self.source = source
        self.on_invalid = on_invalid
        self.items: list[tuple[str, str]] = []

    def add(self, record_id: Any, reason: str) -> None:
        self.items.append((str(record_id), reason))

    def finish(self, num_valid: int) -> list[tuple[str, str]]:
        if not self.items:
            return []
        listed = "; ".join(f"id {record_id}: {reason}" for record_id, reason in self.items[:_MAX_LISTED])
        more = f" (and {len(self.items) - _MAX_LISTED} more)" if len(self.items) > _MAX_LISTED else ""
        message = f"{self.source}: {len(self.items)} invalid record(s): {listed}{more}"
        if self.on_invalid == "raise":
            raise ValueError(message + ". Fix the data, or pass on_invalid='skip' (--on_invalid skip) to leave them out.")
        logger.warning("%s. Skipped them; %d valid records remain.", message, num_valid)
        return list(self.items)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _read_json_or_jsonl(path: Path) -> list[dict]:
    """A JSON list (or a dict with the list under `data`/`questions`/`annotations`), or JSON lines."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    if stripped.startswith("{"):
        try:
            content = json.loads(text)
        except json.JSONDecodeError:
            content = None  # JSON lines starting with an object
        if isinstance(content, dict):
            for key in ("data", "questions", "annotations"):
                if isinstance(content.get(key), list):
                    return content[key]
            raise ValueError(f"{path}: expected a JSON list of records (or JSON lines), got an object with keys "
                             f"{sorted(content)[:10]}")
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from None
    return records


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def _resolve_image(image_root: Path, names: Iterable[str]) -> Path | None:
    """The first existing file among `names` under `image_root` (a name without suffix tries IMAGE_SUFFIXES)."""
    for name in names:
        candidate = Path(name)
        candidate = candidate if candidate.is_absolute() else image_root / candidate
        if candidate.is_file():
            return candidate
        if not candidate.suffix:
            for suffix in IMAGE_SUFFIXES:
                with_suffix = candidate.with_name(candidate.name + suffix)
                if with_suffix.is_file():
                    return with_suffix
    return None


def _image_problem(path: Path) -> str | None:
    """Why `path` cannot be used as an image (None when it decodes). Reads the whole file (PIL `verify`)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"image {path} cannot be decoded ({type(error).__name__}: {error})"
    return None


def _attach_image(record: dict, record_id: Any, image_root: Path, names: Sequence[str], missing_images: str,
                  verify_images: bool, problems: _Problems, key: str = "image") -> bool:
    """Resolve `names` to a file and store it (as str) under `record[key]`; False when the record is bad."""
    path = _resolve_image(image_root, names)
    if path is None:
        if missing_images == "placeholder":
            record[key] = None
            return True
        problems.add(record_id, f"image not found (tried {', '.join(str(image_root / n) for n in names[:3])}); "
                                "pass --image_root, or --missing_images placeholder to use a blank image")
        return False
    if verify_images:
        problem = _image_problem(path)
        if problem is not None:
            problems.add(record_id, problem)
            return False
    record[key] = str(path)
    return True


def load_image(path: str | None, record_id: Any, size: tuple[int, int] = (224, 224)) -> Image.Image:
    """The RGB image of a record; a blank mid-grey placeholder of `size` when `path` is None.

    Raises:
        ValueError: naming the record id and the path when the file is missing or cannot be decoded.
    """
    if path is None:
        return Image.new("RGB", size, PLACEHOLDER_COLOR)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"record {record_id}: cannot decode image {path} ({type(error).__name__}: {error})") from None


# --------------------------------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------------------------------


def _normalize(answer: str) -> str:
    from .metrics import vqa_normalize_answer

    return vqa_normalize_answer(str(answer))


def soft_scores_from_answers(answers: Sequence[str]) -> dict[str, float]:
    """Soft VQA target of every distinct (normalised) human answer: its official VQA accuracy.

    The score of answer `a` is the leave-one-out mean of min(#humans giving `a` / 3, 1), exactly what the
    `vqa_accuracy` metric gives a prediction `a`, so the soft label of the predicted answer is its accuracy. A single
    answer (no leave-one-out possible) gets score 1.
    """
    from .metrics.vqa_accuracy.vqa_accuracy import leave_one_out_accuracy

    normalized = [_normalize(answer) for answer in answers]
    if len(normalized) == 1:
        return {normalized[0]: 1.0}
    return {answer: leave_one_out_accuracy(answer, normalized) for answer in dict.fromkeys(normalized)}


def _human_answers(raw: Any) -> list[str] | None:
    """Human answers as strings, from `["a", ...]` or VQAv2's `[{"answer": "a", ...}, ...]`; None when malformed."""
    if not isinstance(raw, list):
        return None
    answers = []
    for item in raw:
        if isinstance(item, Mapping):
            item = item.get("answer")
        if not isinstance(item, str):
            return None
        answers.append(item)
    return answers


def _vqa_image_names(raw: Mapping) -> list[str]:
    names = []
    if isinstance(raw.get("image"), str):
        names.append(raw["image"])
    for key in ("img_id", "image_id"):
        value = raw.get(key)
        if value is None:
            continue
        value = str(value)
        names.append(value)
        split = value.split("_")[1] if value.startswith("COCO_") and value.count("_") >= 2 else None
        if split:  # COCO layout: <root>/train2014/COCO_train2014_000000051606.jpg
            names.append(f"{split}/{value}")
    return names


def read_vqa(
    path: str | Path,
    image_root: str | Path | None = None,
    format: str | None = None,
    on_invalid: str = "raise",
    missing_images: str = "error",
    verify_images: bool = True,
) -> TaskDataset:
    """Read VQA questions.

    Formats (inferred from the first record when `format` is None):

    - `"okvqa"`: `{sent, question_id, img_id, label: {answer: soft score}}` (the OK-VQA release in `../shared`);
    - `"vqa"`: `{question_id, question, answers, image | img_id | image_id}` with `answers` the human answers (ten in
      VQAv2, A-OKVQA's `direct_answers` too, or VQAv2's `[{"answer": ...}]`): soft labels are their VQA accuracies.

    Images: `image` is a path relative to `image_root` (default: the file's folder); `img_id` / `image_id` name a
    file stem under `image_root` (COCO ids also under their `train2014/` / `val2014/` subfolder).

    Returns:
        A [`TaskDataset`] of records `{id, image, question, answers, soft_labels}`: `answers` the human answers (None
        for soft-label data), `soft_labels` `{normalised answer: score}` (every score > 0 at least once).
    """
    path = Path(path)
    _check_choice("missing_images", missing_images, MISSING_IMAGE_CHOICES)
    raw_records = _read_json_or_jsonl(path)
    if not raw_records:
        raise ValueError(f"{path}: no VQA records")
    if format is None:
        format = "okvqa" if "label" in raw_records[0] and "answers" not in raw_records[0] else "vqa"
    _check_choice("format", format, FORMATS["vqa"])
    image_root = Path(image_root) if image_root is not None else path.parent
    problems = _Problems(str(path), on_invalid)
    records, seen = [], set()
    for position, raw in enumerate(raw_records):
        record_id = raw.get("question_id", raw.get("id", f"#{position}"))
        if str(record_id) in seen:
            problems.add(record_id, "duplicate question id")
            continue
        seen.add(str(record_id))
        question = raw.get("question", raw.get("sent"))
        if not isinstance(question, str) or not question.strip():
            problems.add(record_id, "no question text")
            continue
        answers = None
        if format == "okvqa":
            label = raw.get("label")
            if not isinstance(label, Mapping) or not label:
                problems.add(record_id, "no answers (empty or missing 'label')")
                continue
            try:
                scores = {str(answer): float(score) for answer, score in label.items()}
            except (TypeError, ValueError):
                problems.add(record_id, f"'label' scores are not numbers: {dict(label)}")
                continue
            soft_labels = {}
            for answer, score in scores.items():
                normalized = _normalize(answer)
                soft_labels[normalized] = max(score, soft_labels.get(normalized, score))
        else:
            answers = _human_answers(raw.get("answers", raw.get("direct_answers")))
            if not answers:
                problems.add(record_id, "no answers (empty or missing 'answers')")
                continue
            soft_labels = soft_scores_from_answers(answers)
        if not any(score > 0 for score in soft_labels.values()):
            problems.add(record_id, f"no answer has a positive score: {soft_labels}")
            continue
        record = {"id": str(record_id), "question": question.strip(), "answers": answers, "soft_labels": soft_labels}
        names = _vqa_image_names(raw)
        if not names:
            problems.add(record_id, "no image field ('image', 'img_id' or 'image_id')")
            continue
        if not _attach_image(record, record_id, image_root, names, missing_images, verify_images, problems):
            continue
        records.append(record)
    skipped = problems.finish(len(records))
    if not records:
        raise ValueError(f"{path}: no valid VQA records")
    return TaskDataset("vqa", records, str(path), format, skipped)


def load_answer_vocabulary(path: str | Path) -> dict[str, int]:
    """Answer vocabulary `{answer: label id}` from a JSON `{answer: id}` (e.g. `trainval_ans2label.json`) or a JSON
    list of answers (id = position, e.g. `trainval_label2ans.json`).

    Raises:
        ValueError: when the ids are not exactly 0..N-1 (each once) or an answer is not a string (empty answers are only warned about).
    """
    path = Path(path)
    content = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(content, list):
        content = {answer: index for index, answer in enumerate(content)}
    if not isinstance(content, dict) or not content:
        raise ValueError(f"{path}: an answer vocabulary is a non-empty JSON object {{answer: id}} or list of answers")
    bad = [answer for answer, index in content.items() if not isinstance(answer, str) or not isinstance(index, int)
           or isinstance(index, bool)]
    if bad:
        raise ValueError(f"{path}: answers must be strings with integer ids; bad entries: {bad[:10]}")
    empty = [index for answer, index in content.items() if not answer.strip()]
    if empty:  # OK-VQA's trainval_ans2label.json has one: harmless (no question's answer normalises to it)
        logger.warning("%s: the answer vocabulary has %d empty answer(s) (ids %s); predicting one scores 0",
                       path, len(empty), empty[:10])
    ids = sorted(content.values())
    if ids != list(range(len(ids))):
        duplicates = [index for index, count in Counter(ids).items() if count > 1]
        raise ValueError(
            f"{path}: label ids must be 0..{len(ids) - 1}, each once; "
            + (f"duplicated ids {duplicates[:10]}" if duplicates else f"ids run from {ids[0]} to {ids[-1]}")
        )
    return dict(content)


def build_answer_vocabulary(dataset: TaskDataset, min_count: int = 1, max_size: int | None = None) -> dict[str, int]:
    """Answer vocabulary from training records: every answer with a positive soft score in at least `min_count`
    questions, most frequent first (ties in alphabetical order), at most `max_size` answers."""
    counts = Counter(answer for record in dataset for answer, score in record["soft_labels"].items() if score > 0)
    answers = sorted((answer for answer, count in counts.items() if count >= min_count),
                     key=lambda answer: (-counts[answer], answer))
    if max_size is not None:
        answers = answers[:max_size]
    if not answers:
        raise ValueError(f"no answer occurs in at least {min_count} questions of {dataset.source}")
    return {answer: index for index, answer in enumerate(answers)}


def answer_lookup(label2id: Mapping[str, int]) -> dict[str, int]:
    """`{normalised answer: id}` over a vocabulary; the first id wins when two answers normalise alike."""
    lookup = {}
    for answer, index in sorted(label2id.items(), key=lambda item: item[1]):
        lookup.setdefault(_normalize(answer), index)
    return lookup


def answer_vocabulary_coverage(dataset: TaskDataset, label2id: Mapping[str, int]) -> dict[str, float]:
    """How well a vocabulary covers a dataset's answers: the share of questions with an in-vocabulary answer, and
    the oracle VQA accuracy (mean over questions of the best in-vocabulary soft score), an upper bound of any
    classifier over this vocabulary."""
    lookup = answer_lookup(label2id)
    covered, oracle = 0, 0.0
    for record in dataset:
        scores = [score for answer, score in record["soft_labels"].items() if answer in lookup]
        covered += bool(scores)
        oracle += max(scores, default=0.0)
    total = max(len(dataset), 1)
    return {"questions": len(dataset), "covered": covered / total, "oracle_accuracy": oracle / total}


def vqa_metric_references(dataset: TaskDataset) -> tuple[str, list]:
    """(`vqa_accuracy` config name, references) for a dataset: the human answers (official leave-one-out accuracy)
    when every question has at least two, else the soft labels (config `"soft_scores"`)."""
    if all(record["answers"] is not None and len(record["answers"]) >= 2 for record in dataset):
        return "default", [record["answers"] for record in dataset]
    return "soft_scores", [
        [{"answer": answer, "score": float(score)} for answer, score in record["soft_labels"].items()]
        for record in dataset
    ]


# --------------------------------------------------------------------------------------------------------------------
# Entity linking
# --------------------------------------------------------------------------------------------------------------------


def _mention_span(sentence: str, mention: str) -> list[int] | None:
    start = sentence.find(mention)
    if start < 0:
        start = sentence.lower().find(mention.lower())
    return None if start < 0 else [start, start + len(mention)]


def _wikimel_records(folder: Path, split: str | None, problems: _Problems) -> list[tuple[str, dict, str | None]]:
    """(record id, raw record, image file stem) per (mention, gold QID) pair of a WikiMEL split."""
    samples = json.loads((folder / "samples.json").read_text(encoding="utf-8"))
    if isinstance(samples, list):
        samples = {str(sample["id"]): sample for sample in samples}
    if split is None:
        sample_ids = list(samples)
    else:
        splits_path = folder / "splits.json"
        splits = json.loads(splits_path.read_text(encoding="utf-8"))
        if split not in splits:
            raise ValueError(f"{splits_path} has no split {split!r}; its splits are {sorted(splits)}")
        sample_ids = [str(sample_id) for sample_id in splits[split]]
        absent = [sample_id for sample_id in sample_ids if sample_id not in samples]
        if absent:
            # WikiMEL's splits list ids whose captions were never released (471 of the 4,883 test ids).
            logger.info("%d of the %d %r ids in %s have no record in samples.json (e.g. %s); they are not part of "
                        "the data", len(absent), len(sample_ids), split, splits_path, ", ".join(absent[:5]))
            sample_ids = [sample_id for sample_id in sample_ids if sample_id in samples]
    pairs = []
    for sample_id in sample_ids:
        sample = samples[sample_id]
        mentions, answers = sample.get("mentions") or [], sample.get("answer") or []
        if not mentions or len(mentions) != len(answers):
            problems.add(sample_id, f"{len(mentions)} mentions but {len(answers)} gold entities")
            continue
        for position, (mention, entity_id) in enumerate(zip(mentions, answers)):
            raw = {"sentence": sample.get("sentence"), "mention": mention, "entity_id": entity_id}
            pairs.append((f"{sample_id}-{position}", raw, sample_id))
    return pairs


def read_entity_linking(
    path: str | Path,
    knowledge_ids: Iterable[str] | None = None,
    split: str | None = None,
    image_root: str | Path | None = None,
    format: str | None = None,
    on_invalid: str = "raise",
    missing_images: str | None = None,
    verify_images: bool = True,
) -> TaskDataset:
    """Read entity-linking mentions, one record per (mention, gold entity) pair.

    Formats: `"wikimel"` (a folder, or its `samples.json`, with `splits.json` and `images/<sample id>.jpg`; `split`
    picks `train` / `dev` / `test`, None reads every sample; record ids are `<sample id>-<mention position>`) or
    `"jsonl"` (one `{id, image, sentence, mention, mention_span?, entity_id}` per line: the knowledge world).
    WikiMEL's `entities` field (the gold entity *names*) is never read: it would leak the answer.

    Args:
        knowledge_ids: ids of the knowledge base (e.g. `retriever.ids`); a gold id outside it is a bad record.
        missing_images: `"placeholder"` by default for WikiMEL (see the module docstring), `"error"` otherwise.

    Returns:
        A [`TaskDataset`] of `{id, image, sentence, mention, mention_span, entity_id}` records.
    """
    path = Path(path)
    if format is None:
        format = "wikimel" if (path.is_dir() and (path / "samples.json").exists()) or path.name == "samples.json" \
            else "jsonl"
    _check_choice("format", format, FORMATS["entity-linking"])
    if missing_images is None:
        missing_images = "placeholder" if format == "wikimel" else "error"
    _check_choice("missing_images", missing_images, MISSING_IMAGE_CHOICES)
    known = set(knowledge_ids) if knowledge_ids is not None else None
    problems = _Problems(str(path), on_invalid)
    if format == "wikimel":
        folder = path if path.is_dir() else path.parent
        image_root = Path(image_root) if image_root is not None else folder / "images"
        pairs = _wikimel_records(folder, split, problems)
    else:
        image_root = Path(image_root) if image_root is not None else path.parent
        raw_records = _read_json_or_jsonl(path)
        pairs = []
        for position, raw in enumerate(raw_records):
            image = raw.get("image")
            pairs.append((str(raw.get("id", f"#{position}")), raw, image if isinstance(image, str) else None))
    records, seen, placeholders = [], set(), 0
    for record_id, raw, image_name in pairs:
        if record_id in seen:
            problems.add(record_id, "duplicate record id")
            continue
        seen.add(record_id)
        sentence, mention, entity_id = raw.get("sentence"), raw.get("mention"), raw.get("entity_id")
        if not isinstance(sentence, str) or not sentence.strip():
            problems.add(record_id, "no sentence")
            continue
        if not isinstance(mention, str) or not mention.strip():
            problems.add(record_id, "no mention")
            continue
        if not isinstance(entity_id, str) or not entity_id:
            problems.add(record_id, "no gold entity id")
            continue
        if known is not None and entity_id not in known:
            problems.add(record_id, f"gold entity {entity_id!r} is not in the knowledge base")
            continue
        span = raw.get("mention_span") or _mention_span(sentence, mention)
        record = {"id": record_id, "sentence": sentence.strip(), "mention": mention.strip(),
                  "mention_span": list(span) if span else None, "entity_id": entity_id}
        names = [image_name] if image_name else []
        if not names and missing_images == "error":
            problems.add(record_id, "no image field")
            continue
        if not _attach_image(record, record_id, image_root, names, missing_images, verify_images, problems):
            continue
        placeholders += record["image"] is None
        records.append(record)
    skipped = problems.finish(len(records))
    if not records:
        raise ValueError(f"{path}: no valid entity-linking records" + (f" in split {split!r}" if split else ""))
    if placeholders:
        logger.info("%s: %d of %d mentions have no image file and get a blank placeholder image",
                    path, placeholders, len(records))
    return TaskDataset("entity-linking", records, str(path) + (f":{split}" if split else ""), format, skipped)


# --------------------------------------------------------------------------------------------------------------------
# Image-text retrieval
# --------------------------------------------------------------------------------------------------------------------


def read_captions(
    path: str | Path,
    image_root: str | Path | None = None,
    on_invalid: str = "raise",
    missing_images: str = "error",
    verify_images: bool = True,
) -> TaskDataset:
    """Read an image-caption CSV with columns `image,caption` (several rows per image allowed).

    `image` is relative to `image_root` (default: the CSV's folder, then its `images/` subfolder). Record ids are
    `<row number>` (1-based, header excluded). Returns `{id, image, caption}` records.
    """
    path = Path(path)
    _check_choice("missing_images", missing_images, MISSING_IMAGE_CHOICES)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing_columns = {"image", "caption"} - set(reader.fieldnames or ())
        if missing_columns:
            raise ValueError(f"{path}: a captions CSV needs the columns image,caption; missing {sorted(missing_columns)}"
                             f" (found {reader.fieldnames})")
        rows = list(reader)
    roots = [Path(image_root)] if image_root is not None else [path.parent, path.parent / "images"]
    problems = _Problems(str(path), on_invalid)
    records, checked = [], {}
    for row_number, row in enumerate(rows, start=1):
        caption, image = (row.get("caption") or "").strip(), (row.get("image") or "").strip()
        if not caption:
            problems.add(row_number, "empty caption")
            continue
        if not image:
            problems.add(row_number, "no image")
            continue
        record = {"id": str(row_number), "caption": caption}
        if image not in checked:  # verify each image once, however many captions it has
            root = next((root for root in roots if _resolve_image(root, [image]) is not None), roots[0])
            probe: dict = {}
            local = _Problems(str(path), "skip")
            ok = _attach_image(probe, row_number, root, [image], missing_images, verify_images, local)
            checked[image] = (ok, probe.get("image"), local.items[0][1] if local.items else None)
        ok, resolved, reason = checked[image]
        if not ok:
            problems.add(row_number, reason)
            continue
        record["image"] = resolved
        records.append(record)
    skipped = problems.finish(len(records))
    if not records:
        raise ValueError(f"{path}: no valid caption rows")
    return TaskDataset("retrieval", records, str(path), "captions", skipped)


# --------------------------------------------------------------------------------------------------------------------
# Pair classification
# --------------------------------------------------------------------------------------------------------------------


def _nlvr2_image_names(raw: Mapping) -> list[str]:
    """NLVR2 images: `left_image`/`right_image`, `images`, the URLs' file names, or `<split>-<set>-<pair>-img{0,1}`."""
    if raw.get("left_image") and raw.get("right_image"):
        return [raw["left_image"], raw["right_image"]]
    if isinstance(raw.get("images"), list):
        return [str(name) for name in raw["images"]]
    if raw.get("left_url") and raw.get("right_url"):
        return [str(raw["left_url"]).rsplit("/", 1)[-1], str(raw["right_url"]).rsplit("/", 1)[-1]]
    identifier = str(raw.get("identifier", ""))
    if identifier.count("-") >= 3:
        stem = identifier.rsplit("-", 1)[0]
        return [f"{stem}-img0", f"{stem}-img1"]
    return []


def read_classification(
    path: str | Path,
    image_root: str | Path | None = None,
    format: str | None = None,
    labels: Sequence[str] | None = None,
    on_invalid: str = "raise",
    missing_images: str = "error",
    verify_images: bool = True,
) -> TaskDataset:
    """Read image-text pair classification JSONL.

    Formats: `"snli-ve"` (`Flickr30K_ID` or `image`, `sentence2` the hypothesis, `gold_label`), `"nlvr2"`
    (`identifier`, `sentence`, `label` True/False, two images: see `_nlvr2_image_names`), `"jsonl"` (`image` or
    `images`, `sentence` / `text` / `hypothesis`, `label`). Labels are strings (booleans and ints are converted).

    Args:
        labels: the class names, position = class id. Default: SNLI-VE's (entailment, neutral, contradiction) or
            NLVR2's (False, True) when the data's labels are among them, else the sorted labels of the data. A record
            whose label is not among `labels` is a bad record (e.g. SNLI-VE's "-", no annotator consensus).

    Returns:
        A [`TaskDataset`] of `{id, images, text, label}` records (`images`: one path, or two for NLVR2) with
        `dataset.labels` the class names.
    """
    path = Path(path)
    _check_choice("missing_images", missing_images, MISSING_IMAGE_CHOICES)
    raw_records = _read_json_or_jsonl(path)
    if not raw_records:
        raise ValueError(f"{path}: no classification records")
    if format is None:
        first = raw_records[0]
        format = "snli-ve" if "gold_label" in first or "Flickr30K_ID" in first else \
            "nlvr2" if "identifier" in first and ("left_url" in first or "left_image" in first or "images" not in first) \
            else "jsonl"
    _check_choice("format", format, FORMATS["classification"])
    image_root = Path(image_root) if image_root is not None else path.parent
    problems = _Problems(str(path), on_invalid)

    def label_of(raw):
        value = raw.get("gold_label", raw.get("label"))
        return str(value) if value is not None else None

    if labels is None:
        present = {label_of(raw) for raw in raw_records} - {None, "-", ""}
        labels = next((list(known) for known in (SNLI_VE_LABELS, NLVR2_LABELS) if present <= set(known)),
                      sorted(present))
    labels = [str(label) for label in labels]
    records, seen = [], set()
    for position, raw in enumerate(raw_records):
        record_id = str(raw.get("identifier", raw.get("pairID", raw.get("id", f"#{position}"))))
        if record_id in seen:
            problems.add(record_id, "duplicate record id")
            continue
        seen.add(record_id)
        text = raw.get("sentence2", raw.get("hypothesis", raw.get("sentence", raw.get("text"))))
        if not isinstance(text, str) or not text.strip():
            problems.add(record_id, "no text")
            continue
        label = label_of(raw)
        if label not in labels:
            problems.add(record_id, f"label {label!r} is not one of {labels}")
            continue
        if format == "nlvr2":
            names = _nlvr2_image_names(raw)
            expected = 2
        elif format == "snli-ve" and "Flickr30K_ID" in raw:
            names, expected = [str(raw["Flickr30K_ID"])], 1
        else:
            names = raw["images"] if isinstance(raw.get("images"), list) else [raw.get("image")]
            names, expected = [str(name) for name in names if name], len(names)
        if len(names) != expected or not names:
            problems.add(record_id, f"expected {expected} image name(s), found {names}")
            continue
        record = {"id": record_id, "text": text.strip(), "label": label, "images": []}
        ok = True
        for name in names:
            holder: dict = {}
            if not _attach_image(holder, record_id, image_root, [name], missing_images, verify_images, problems):
                ok = False
                break
            record["images"].append(holder["image"])
        if ok:
            records.append(record)
    skipped = problems.finish(len(records))
    if not records:
        raise ValueError(f"{path}: no valid classification records")
    counts = {len(record["images"]) for record in records}
    if len(counts) > 1:
        raise ValueError(f"{path}: records mix one and two images ({sorted(counts)}); one kind per dataset")
    return TaskDataset("classification", records, str(path), format, skipped, labels)


# --------------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ReadOptions:
    """Reader options shared by `reavl finetune` and `reavl evaluate` (see each reader for their meaning)."""

    image_root: str | None = None
    format: str | None = None
    on_invalid: str = "raise"
    missing_images: str | None = None
    verify_images: bool = True
    labels: Sequence[str] | None = None
    knowledge_ids: Iterable[str] | None = field(default=None, repr=False)


def read_task_data(task: str, path: str | Path, split: str | None = None,
                   options: ReadOptions | None = None) -> TaskDataset:
    """Read `path` with the reader of `task` (one of `TASKS`)."""
    _check_choice("task", task, TASKS)
    options = options or ReadOptions()
    common = {"image_root": options.image_root, "on_invalid": options.on_invalid,
              "verify_images": options.verify_images}
    missing = {} if options.missing_images is None else {"missing_images": options.missing_images}
    if task == "vqa":
        return read_vqa(path, format=options.format, **common, **missing)
    if task == "entity-linking":
        return read_entity_linking(path, knowledge_ids=options.knowledge_ids, split=split, format=options.format,
                                   missing_images=options.missing_images, **common)
    if task == "retrieval":
        return read_captions(path, **common, **missing)
    return read_classification(path, format=options.format, labels=options.labels, **common, **missing)


# --------------------------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------------------------


def _image_size(processor) -> tuple[int, int]:
    """(width, height) the processor resizes to, for placeholder images."""
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    if isinstance(size, Mapping):
        height = size.get("height", size.get("shortest_edge", 224))
        width = size.get("width", size.get("shortest_edge", 224))
        return int(width), int(height)
    return (int(size), int(size)) if isinstance(size, int) else (224, 224)


class _ProcessorCollator:
    """Shared part of the task collators: images and texts through the processor, knowledge on/off."""

    def __init__(self, processor, max_length: int = 64, use_knowledge: bool = True):
        self.processor = processor
        self.max_length = max_length
        self.use_knowledge = use_knowledge
        self.placeholder_size = _image_size(processor)

    def images(self, records: Sequence[dict], key: str = "image") -> list[Image.Image]:
        return [load_image(record[key], record["id"], self.placeholder_size) for record in records]

    def encode(self, images: list, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.processor(images=images, text=texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length)
        return {name: encoded[name] for name in ("pixel_values", "input_ids", "attention_mask")}

    def finish(self, batch: dict) -> dict:
        if not self.use_knowledge:
            batch["use_knowledge"] = False
        return batch


class VqaCollator(_ProcessorCollator):
    """VQA batch: `pixel_values`, `input_ids`, `attention_mask` and soft `labels` `(batch, num_labels)`.

    Answers outside the vocabulary have no column and are dropped from the targets (standard VQA practice); the
    evaluation scores predictions against the full human answers, so they still count there.
    """

    def __init__(self, processor, label2id: Mapping[str, int], max_length: int = 40, use_knowledge: bool = True):
        super().__init__(processor, max_length, use_knowledge)
        self.lookup = answer_lookup(label2id)
        self.num_labels = len(label2id)

    def __call__(self, records: Sequence[dict]) -> dict:
        batch = self.encode(self.images(records), [record["question"] for record in records])
        labels = torch.zeros(len(records), self.num_labels)
        for row, record in enumerate(records):
            for answer, score in record["soft_labels"].items():
                index = self.lookup.get(answer)
                if index is not None:
                    labels[row, index] = max(labels[row, index].item(), float(score))
        batch["labels"] = labels
        return self.finish(batch)


def mention_token_mask(offsets: Sequence[Sequence[int]], span: Sequence[int] | None) -> list[int]:
    """1 on the tokens whose characters overlap `span` = [start, end) of the text, from a tokenizer's offset mapping
    (special tokens have empty offsets and are never marked); all 0 without a span."""
    if not span:
        return [0] * len(offsets)
    start, end = span
    return [int(token_end > token_start and token_start < end and token_end > start)
            for token_start, token_end in offsets]


class EntityLinkingCollator(_ProcessorCollator):
    """Entity-linking batch: `pixel_values`, `input_ids` / `attention_mask` of the sentence, `mention_mask`
    `(batch, length)` on the tokens overlapping the mention's characters, and `gold_knowledge_index` `(batch,)`: the
    index row of the gold entity (from `knowledge_index_of`, e.g. `retriever.index_of`).

    The text is the sentence alone and the mention is marked by `mention_mask`, exactly as the entity-linking
    pipeline (`modeling_reavl/pipeline_reavl.py`) prepares its inputs, so a fine-tuned model sees at inference what
    it was trained on. A mention that does not occur in the sentence (WikiMEL has some) gets an empty mask, and the
    head reads the fused [CLS] instead. Candidates are retrieved later, with the model being trained (see
    `training.finetune.ReavlTrainer`).
    """

    def __init__(self, processor, knowledge_index_of: Callable[[str], int], max_length: int = 64,
                 use_knowledge: bool = True):
        super().__init__(processor, max_length, use_knowledge)
        self.knowledge_index_of = knowledge_index_of
        self.tokenizer = processor.tokenizer

    def __call__(self, records: Sequence[dict]) -> dict:
        sentences = [record["sentence"] for record in records]
        batch = self.encode(self.images(records), sentences)
        input_ids = batch["input_ids"]
        encoding = self.tokenizer(sentences, return_offsets_mapping=True, truncation=True, max_length=self.max_length)
        mention_mask = torch.zeros_like(input_ids)
        for row, record in enumerate(records):
            token_ids = encoding["input_ids"][row]
            if token_ids != input_ids[row, : len(token_ids)].tolist():
                raise ValueError(f"record {record['id']}: the processor tokenizes the sentence differently from its "
                                 "tokenizer; cannot locate the mention")
            mask = mention_token_mask(encoding["offset_mapping"][row], record.get("mention_span"))
            mention_mask[row, : len(mask)] = torch.tensor(mask, dtype=mention_mask.dtype)
        batch["mention_mask"] = mention_mask
        gold = []
        for record in records:
            try:
                gold.append(int(self.knowledge_index_of(record["entity_id"])))
            except (KeyError, ValueError, IndexError):
                raise ValueError(f"record {record['id']}: gold entity {record['entity_id']!r} is not in the "
                                 "knowledge index") from None
        batch["gold_knowledge_index"] = torch.tensor(gold, dtype=torch.long)
        return self.finish(batch)


class RetrievalCollator(_ProcessorCollator):
    """Image-text retrieval batch: paired `pixel_values` / `input_ids` / `attention_mask` and `return_loss=True`
    (symmetric ITC loss). Two captions of one image in a batch are false negatives for each other, as in CLIP."""

    def __init__(self, processor, max_length: int = 64):
        super().__init__(processor, max_length, use_knowledge=True)

    def __call__(self, records: Sequence[dict]) -> dict:
        batch = self.encode(self.images(records), [record["caption"] for record in records])
        batch["return_loss"] = True
        return batch


class ClassificationCollator(_ProcessorCollator):
    """Pair-classification batch: `pixel_values` `(batch, C, H, W)` (or `(batch, 2, C, H, W)` for two images),
    `input_ids`, `attention_mask` and class-id `labels` `(batch,)`."""

    def __init__(self, processor, labels: Sequence[str], max_length: int = 64, use_knowledge: bool = True):
        super().__init__(processor, max_length, use_knowledge)
        self.label2id = {label: index for index, label in enumerate(labels)}

    def __call__(self, records: Sequence[dict]) -> dict:
        num_images = len(records[0]["images"])
        images = [load_image(path, record["id"], self.placeholder_size) for record in records
                  for path in record["images"]]
        texts = [record["text"] for record in records for _ in range(num_images)]
        batch = self.encode(images, texts)
        if num_images > 1:
            pixel_values = batch["pixel_values"]
            batch["pixel_values"] = pixel_values.reshape(len(records), num_images, *pixel_values.shape[1:])
            batch["input_ids"] = batch["input_ids"][::num_images]
            batch["attention_mask"] = batch["attention_mask"][::num_images]
        batch["labels"] = torch.tensor([self.label2id[record["label"]] for record in records], dtype=torch.long)
        return self.finish(batch)


__all__ = [
    "FORMATS",
    "TASKS",
    "ClassificationCollator",
    "EntityLinkingCollator",
    "ReadOptions",
    "RetrievalCollator",
    "TaskDataset",
    "VqaCollator",
    "answer_lookup",
    "answer_vocabulary_coverage",
    "build_answer_vocabulary",
    "load_answer_vocabulary",
    "load_image",
    "mention_token_mask",
    "read_captions",
    "read_classification",
    "read_entity_linking",
    "read_task_data",
    "read_vqa",
    "soft_scores_from_answers",
    "vqa_metric_references",
]
