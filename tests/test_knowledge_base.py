"""Knowledge-base loaders, validation and entry text, on tiny hand-written files and on the real data."""

import json
import time
import warnings

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from processing.knowledge_base import (
    KNOWLEDGE_COLUMNS,
    KNOWLEDGE_FEATURES,
    KnowledgeBaseError,
    UnknownTripleTailWarning,
    entry_to_text,
    format_triples,
    id_to_title_map,
    load_knowledge_base,
    validate_knowledge_base,
)
from tests.conftest import require_shared_data

# Three entries; every triple tail is a KB id, so loading warns about nothing.
ENTRIES = [
    {
        "id": "Q7259",
        "title": "Ada Lovelace",
        "text": "English mathematician and writer.",
        "aliases": ["Augusta Ada King"],
        "triples": [["P106", "Q170790"], ["P22", "Q5679"]],
        "image": "images/ada.jpg",
    },
    {"id": "Q5679", "title": "Lord Byron", "text": "English poet.", "aliases": [], "triples": [], "image": None},
    {"id": "Q170790", "title": "mathematician", "text": "Person who studies mathematics.", "aliases": [],
     "triples": [], "image": None},
]


def _schema_part(knowledge_base):
    """The KB features restricted to the schema columns."""
    return {name: knowledge_base.features[name] for name in KNOWLEDGE_COLUMNS}


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# Generic formats
# --------------------------------------------------------------------------------------


def test_jsonl_loads_every_column_and_keeps_extra_ones(tmp_path):
    records = [dict(entry, popularity=rank) for rank, entry in enumerate(ENTRIES)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all triple tails are known: no warning expected
        kb = load_knowledge_base(_write_jsonl(tmp_path / "kb.jsonl", records))

    assert kb.num_rows == 3
    assert kb.column_names == [*KNOWLEDGE_COLUMNS, "popularity"]
    assert _schema_part(kb) == dict(KNOWLEDGE_FEATURES)
    assert kb[0]["aliases"] == ["Augusta Ada King"]
    assert kb[0]["triples"] == [["P106", "Q170790"], ["P22", "Q5679"]]
    assert kb[0]["image"] == "images/ada.jpg" and kb[1]["image"] is None
    assert kb["popularity"][:] == [0, 1, 2]


def test_json_array_file_and_missing_optional_columns_get_defaults(tmp_path):
    path = tmp_path / "kb.json"
    path.write_text(json.dumps([{"id": "a", "title": "Alpha", "text": "First letter."},
                                {"id": "b", "title": "Beta", "text": "Second letter.", "aliases": ["B"]}]))
    kb = load_knowledge_base(path)

    assert kb["aliases"][:] == [[], ["B"]]
    assert kb["triples"][:] == [[], []]
    assert kb["image"][:] == [None, None]


def test_jsonl_with_a_broken_line_names_the_line(tmp_path):
    path = tmp_path / "kb.jsonl"
    path.write_text('{"id": "a", "title": "A", "text": "x"}\n{"id": "b", oops}\n')
    with pytest.raises(KnowledgeBaseError, match=r"line 2 is not a JSON object"):
        load_knowledge_base(path)


def test_parquet_without_image_column(tmp_path):
    columns = {name: [entry[name] for entry in ENTRIES] for name in ("id", "title", "text", "aliases", "triples")}
    pq.write_table(pa.table(columns), tmp_path / "kb.parquet")
    kb = load_knowledge_base(tmp_path / "kb.parquet")

    assert kb.num_rows == 3
    assert kb["image"][:] == [None, None, None]
    assert kb[0]["triples"][1] == ["P22", "Q5679"]


def test_csv_splits_aliases_on_pipes_and_parses_triples_json(tmp_path):
    path = tmp_path / "kb.csv"
    path.write_text(
        "id,title,text,aliases,triples,image,topic\n"
        'Q90,Paris,"Capital of France, on the Seine.",City of Light|Lutetia,"[[""P17"", ""Q142""]]",,Places\n'
        "Q142,France,Country in Europe.,,,flags/fr.png,Places\n",
        encoding="utf-8",
    )
    kb = load_knowledge_base(path)

    assert kb["id"][:] == ["Q90", "Q142"]
    assert kb[0]["text"] == "Capital of France, on the Seine."
    assert kb["aliases"][:] == [["City of Light", "Lutetia"], []]
    assert kb["triples"][:] == [[["P17", "Q142"]], []]
    assert kb["image"][:] == [None, "flags/fr.png"]  # empty cell -> None
    assert kb["topic"][:] == ["Places", "Places"]


def test_csv_with_other_separators(tmp_path):
    path = tmp_path / "kb.csv"
    path.write_text("id;title;text;aliases\nQ90;Paris;Capital of France.;Paname/Lutetia\n", encoding="utf-8")
    kb = load_knowledge_base(path, delimiter=";", alias_separator="/")
    assert kb[0]["aliases"] == ["Paname", "Lutetia"]


def test_csv_bad_triples_cell_names_the_row(tmp_path):
    path = tmp_path / "kb.csv"
    path.write_text("id,title,text,triples\nQ1,A,x,[]\nQ2,B,y,P31 Q5\n", encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match=r"row 1 \(id 'Q2'\): 'triples' must be a JSON list"):
        load_knowledge_base(path)


def test_in_memory_dataset_gets_optional_columns_and_string_ids():
    dataset = datasets.Dataset.from_dict({"id": [1, 2], "title": ["One", "Two"], "text": ["Uno.", "Dos."]})
    kb = load_knowledge_base(dataset)

    assert kb["id"][:] == ["1", "2"]
    assert _schema_part(kb) == dict(KNOWLEDGE_FEATURES)
    assert kb["aliases"][:] == [[], []] and kb["image"][:] == [None, None]


def test_saved_dataset_folder_is_recognised(tmp_path):
    datasets.Dataset.from_list(ENTRIES).save_to_disk(str(tmp_path / "kb"))
    kb = load_knowledge_base(tmp_path / "kb")
    assert kb["title"][:] == ["Ada Lovelace", "Lord Byron", "mathematician"]


def test_list_of_dicts_with_ragged_keys():
    kb = load_knowledge_base([
        {"id": "x", "title": "X", "text": "The letter x.", "aliases": "ex"},
        {"id": "y", "title": "Y", "text": "The letter y.", "triples": [("rel", "x")]},
    ])
    assert kb["aliases"][:] == [["ex"], []]  # a single alias string becomes a one-item list
    assert kb["triples"][:] == [[], [["rel", "x"]]]


def test_unknown_format_option_and_suffix_are_rejected(tmp_path):
    with pytest.raises(KnowledgeBaseError, match=r"unknown knowledge base format 'xml'"):
        load_knowledge_base(ENTRIES, format="xml")
    with pytest.raises(KnowledgeBaseError, match=r"format 'records' takes no option\(s\) \['names'\]"):
        load_knowledge_base(ENTRIES, names={})
    (tmp_path / "kb.xlsx").write_text("")
    with pytest.raises(KnowledgeBaseError, match=r"from its suffix"):
        load_knowledge_base(tmp_path / "kb.xlsx")
    with pytest.raises(FileNotFoundError):
        load_knowledge_base(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def test_missing_required_columns_are_named_with_the_columns_present():
    with pytest.raises(KnowledgeBaseError) as raised:
        load_knowledge_base([{"id": "a", "name": "Alpha"}])
    message = str(raised.value)
    assert "missing required column(s) ['title', 'text']" in message
    assert "columns present: ['id', 'name']" in message


def test_duplicate_ids_are_listed_with_their_rows():
    records = [{"id": entry_id, "title": "t", "text": "x"} for entry_id in ["a", "b", "a", "c", "b", "a"]]
    with pytest.raises(KnowledgeBaseError) as raised:
        load_knowledge_base(records)
    assert "2 duplicated id(s) in 5 rows: 'a' at rows [0, 2, 5], 'b' at rows [1, 4]" in str(raised.value)


def test_many_duplicates_are_truncated_to_twenty_with_a_count():
    records = [{"id": f"id{i % 25}", "title": "t", "text": "x"} for i in range(50)]
    with pytest.raises(KnowledgeBaseError, match=r"25 duplicated id\(s\) in 50 rows: .*\.\.\. and 5 more"):
        load_knowledge_base(records)


def test_empty_texts_are_named_by_row_and_id():
    records = [
        {"id": "a", "title": "A", "text": "fine"},
        {"id": "b", "title": "B", "text": "   "},
        {"id": "c", "title": "C", "text": None},
    ]
    with pytest.raises(KnowledgeBaseError, match=r"2 row\(s\) have an empty 'text': row 1 \(id 'b'\), row 2 \(id 'c'\)"):
        load_knowledge_base(records)


def test_all_problems_are_reported_together():
    records = [{"id": "a", "title": "A", "text": ""}, {"id": "a", "title": "", "text": "x"}]
    with pytest.raises(KnowledgeBaseError) as raised:
        load_knowledge_base(records)
    message = str(raised.value)
    assert "empty 'title': row 1 (id 'a')" in message
    assert "empty 'text': row 0 (id 'a')" in message
    assert "'a' at rows [0, 1]" in message


def test_malformed_triples_are_errors():
    records = [{"id": "a", "title": "A", "text": "x", "triples": [["P31"], ["P31", "a"]]}]
    with pytest.raises(KnowledgeBaseError, match=r"1 triple\(s\) are not \[relation, tail\] pairs: row 0 \(id 'a'\)"):
        load_knowledge_base(records)


def test_triples_to_unknown_ids_warn_with_their_count():
    records = [
        {"id": "a", "title": "A", "text": "x", "triples": [["P31", "b"], ["P31", "Q404"], ["P17", "Q405"]]},
        {"id": "b", "title": "B", "text": "y", "triples": [["P361", "Q404"]]},
    ]
    with pytest.warns(UnknownTripleTailWarning, match=r"3 triple\(s\) in 2 entries point at ids that are not") as caught:
        kb = load_knowledge_base(records)
    assert "a -P31-> Q404" in str(caught[0].message)
    assert kb.num_rows == 2  # a warning, not an error


def test_validation_respects_selected_rows_and_is_fast():
    rows = 20_000
    kb = load_knowledge_base({"id": f"Q{i}", "title": f"Entity {i}", "text": f"Entity number {i}.",
                              "triples": [["P1", f"Q{(i + 1) % rows}"]]} for i in range(rows))
    started = time.perf_counter()
    validate_knowledge_base(kb)
    assert time.perf_counter() - started < 1.0

    # A select() with repeated rows is a duplicated-id KB: validation reads through the index mapping.
    with pytest.raises(KnowledgeBaseError, match=r"'Q7' at rows \[0, 1\]"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownTripleTailWarning)  # Q7's tail Q8 was not selected
        validate_knowledge_base(kb.select([7, 7]))


# --------------------------------------------------------------------------------------
# Entry text
# --------------------------------------------------------------------------------------


def test_entry_to_text_format():
    names = {"Q170790": "mathematician", "Q5679": "Lord Byron"}
    ada = ENTRIES[0]
    assert entry_to_text(ada["title"], ada["text"], ada["triples"], names) == (
        "Ada Lovelace. English mathematician and writer. P106: mathematician; P22: Lord Byron."
    )
    # Unknown tails show their id; relation labels are optional; max_triples caps the facts.
    assert entry_to_text("Ada Lovelace", "Writer.", [["P22", "Q5679"], ["P106", "Q1"]], {},
                         relation_to_label={"P22": "father"}) == "Ada Lovelace. Writer. father: Q5679; P106: Q1."
    assert entry_to_text("Ada Lovelace", "Writer.", ada["triples"], names, max_triples=1) == (
        "Ada Lovelace. Writer. P106: mathematician."
    )
    assert entry_to_text("Ada Lovelace", "Writer.", ada["triples"], names, max_triples=0) == "Ada Lovelace. Writer."


def test_entry_to_text_edge_cases():
    assert entry_to_text("Who?", "A question.") == "Who? A question."  # no extra period after "?"
    assert entry_to_text("Paris", "paris") == "Paris."  # text that repeats the title is dropped
    assert entry_to_text("  Paris ", None, ()) == "Paris."
    # Facts already in the text (texts generated from triples) are not repeated.
    triples = [["P17", "Q142"], ["P36", "Q90"]]
    text = format_triples(triples) + "."
    assert text == "P17: Q142; P36: Q90."
    assert entry_to_text("Q90", text, triples) == "Q90. P17: Q142; P36: Q90."


# --------------------------------------------------------------------------------------
# Public formats on tiny files
# --------------------------------------------------------------------------------------


def test_wikimel_folder_uses_name_when_description_missing(tmp_path):
    (tmp_path / "qid2ne.json").write_text(json.dumps({"Q1001": "Mahatma Gandhi", "Q90": "Paris"}))
    (tmp_path / "qid2abs.json").write_text(json.dumps({"Q1001": "Sex: male. Birth: 1869, Porbandar.",
                                                       "Q999": "no name for this one"}))
    with pytest.warns(UserWarning, match=r"1 WikiMEL entities have no description"):
        kb = load_knowledge_base(tmp_path)

    assert kb["id"][:] == ["Q1001", "Q90"]
    assert kb["title"][:] == ["Mahatma Gandhi", "Paris"]
    assert kb["text"][:] == ["Sex: male. Birth: 1869, Porbandar.", "Paris"]


def test_wikidata_triples_entries_inverse_facts_and_questions(tmp_path):
    (tmp_path / "train.txt").write_text(
        "Q7370831\tP162\tQ361208\twho produced the film rough house rosie\n"
        "Q126399\tR272\tQ7370831\twhat movie is produced by warner bros.\n"
        "Q7370831\tP162\tQ361208\twho was the producer of rough house rosie\n",
        encoding="utf-8",
    )
    kb = load_knowledge_base(tmp_path)  # a folder of .txt files -> wikidata-triples

    assert kb["id"][:] == ["Q7370831", "Q361208", "Q126399"]  # order of first appearance
    film = kb[0]
    # The repeated fact is kept once; the R272 line adds its inverse P272 to the film.
    assert film["triples"] == [["P162", "Q361208"], ["P272", "Q126399"]]
    assert film["questions"] == ["who produced the film rough house rosie", "who was the producer of rough house rosie"]
    assert film["title"] == "Q7370831" and film["text"] == "P162: Q361208; P272: Q126399."
    assert kb[1]["triples"] == [["R162", "Q7370831"]]  # the object got the inverse fact
    assert kb[2]["questions"] == ["what movie is produced by warner bros."]

    named = load_knowledge_base(tmp_path / "train.txt", names={"Q7370831": "Rough House Rosie",
                                                                "Q361208": "Clara Bow"}, add_inverse=False)
    assert named[0]["title"] == "Rough House Rosie"
    assert named[0]["text"] == "P162: Clara Bow."
    assert named[1]["triples"] == []
    assert named[1]["text"] == "Clara Bow"  # no facts of its own: the title stands in as text


def test_wikidata_malformed_line_is_named(tmp_path):
    (tmp_path / "bad.tsv").write_text("Q1\tP31\n")
    with pytest.raises(KnowledgeBaseError, match=r"bad.tsv line 1: expected subject<TAB>property<TAB>object"):
        load_knowledge_base(tmp_path / "bad.tsv")


def test_wikipedia_summaries_keep_description_and_topic(tmp_path):
    summaries = {
        "Dog": {"title": "Dog", "extract": "The dog is a domesticated descendant of the wolf.",
                "description": "Domesticated canid", "topic": "Biology"},
        "Paris": {"title": "Paris", "extract": "", "description": "Capital of France", "topic": "Geography"},
    }
    (tmp_path / "summaries_en-us.json").write_text(json.dumps(summaries), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"1 Wikipedia articles .* have no extract"):
        kb = load_knowledge_base(tmp_path)

    assert kb.column_names == [*KNOWLEDGE_COLUMNS, "description", "topic"]
    assert kb["id"][:] == ["Dog", "Paris"]
    assert kb["text"][:] == ["The dog is a domesticated descendant of the wolf.", "Capital of France"]
    assert kb["topic"][:] == ["Biology", "Geography"]


# --------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_wikimel_has_18880_entities():
    folder = require_shared_data("wikimel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entity has a description
        kb = load_knowledge_base(folder)
    assert kb.num_rows == 18_880
    gandhi = kb[kb["id"][:].index("Q1001")]
    assert gandhi["title"] == "Mahatma Gandhi"
    assert gandhi["text"].startswith("Sex: male.")


@pytest.mark.realdata
def test_real_wikipedia_summaries_have_10033_articles():
    kb = load_knowledge_base(require_shared_data("wikipedia_vital", "summaries_en-us.json"), format="wikipedia-summaries")
    assert kb.num_rows == 10_033
    row = kb["id"][:].index("2001: A Space Odyssey")
    assert kb[row]["text"].startswith("2001: A Space Odyssey is a 1968 epic science fiction film")
    assert kb[row]["description"] and kb[row]["topic"]


@pytest.mark.realdata
def test_real_wikidata_triples_with_wikimel_names():
    names = id_to_title_map(load_knowledge_base(require_shared_data("wikimel")))
    kb = load_knowledge_base(require_shared_data("wikidata_simplequestions"), names=names)

    facts = sum(len(triples) for triples in kb["triples"][:])
    questions = sum(len(entry_questions) for entry_questions in kb["questions"][:])
    assert kb.num_rows > 10_000
    assert facts > 49_202  # every line gives a fact and (unless repeated) its inverse
    assert questions > 40_000
    # Some SimpleQuestions entities are also WikiMEL entities and get their name as title.
    titled = [title for entry_id, title in zip(kb["id"][:], kb["title"][:]) if title != entry_id]
    assert len(titled) > 100
