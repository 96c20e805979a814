"""Mention linking by title/alias matching: matching rules, offsets, ambiguity, and the real Wikipedia KB."""

import csv
import time

import datasets
import pytest

from processing.knowledge_base import load_knowledge_base
from processing.mention_linker import Mention, MentionLinker, normalise_name
from tests.conftest import require_shared_data


def _links(linker, text):
    """(entry id, surface) pairs, the shape most assertions read best in."""
    return [(mention.entry_id, mention.surface) for mention in linker.link(text)]


@pytest.fixture
def city_linker():
    return MentionLinker(
        ids=["Q60", "Q1384", "Q11299", "Q90", "Q243"],
        titles=["New York City", "New York", "City Hall", "Paris", "Eiffel Tower"],
        aliases=[["Big Apple", "NYC"], [], [], ["City of Light"], []],
    )


def test_longest_name_wins(city_linker):
    assert _links(city_linker, "I love New York City.") == [("Q60", "New York City")]
    assert _links(city_linker, "I love New York state.") == [("Q1384", "New York")]


def test_matches_do_not_overlap_and_scan_left_to_right(city_linker):
    # "New York City" is taken first, so "City Hall" (which shares "City") is not linked.
    assert _links(city_linker, "New York City Hall") == [("Q60", "New York City")]
    # Without the overlap, both link.
    assert _links(city_linker, "New York and City Hall") == [("Q1384", "New York"), ("Q11299", "City Hall")]


def test_offsets_give_back_the_surface_text(city_linker):
    text = "From the  Big   Apple to Paris, the «City of Light», and its Eiffel-Tower!"
    mentions = city_linker.link(text)
    assert [(m.entry_id, m.start_char, m.end_char) for m in mentions] == [
        ("Q60", 10, 21), ("Q90", 25, 30), ("Q90", 37, 50), ("Q243", 61, 73)
    ]
    for mention in mentions:
        assert text[mention.start_char : mention.end_char] == mention.surface
    assert mentions[0].surface == "Big   Apple"  # original spacing kept in the surface


def test_aliases_link_to_their_entry(city_linker):
    assert _links(city_linker, "nyc at night") == [("Q60", "nyc")]
    assert city_linker.link("NYC")[0] == Mention(0, "Q60", 0, 3, "NYC", (0,))


def test_case_punctuation_and_accents_are_ignored():
    linker = MentionLinker(["Q1", "Q2", "Q3"], ["Spider-Man", "Café de Flore", "O'Brien"])
    assert _links(linker, "SPIDER MAN met spider-man") == [("Q1", "SPIDER MAN"), ("Q1", "spider-man")]
    assert _links(linker, "coffee at cafe de flore") == [("Q2", "cafe de flore")]
    assert _links(linker, "Mr. OBrien and Mr. O Brien") == [("Q3", "O Brien")]  # tokens, not characters
    assert normalise_name("  Café   de FLORE! ") == ("cafe", "de", "flore")


def test_whole_tokens_only():
    linker = MentionLinker(["Q90"], ["Paris"])
    assert _links(linker, "a Parisian café in Paris-Nord") == [("Q90", "Paris")]


def test_short_stopword_and_numeric_names_are_skipped():
    titles = ["The", "It", "Us", "AI", "1", "1969", "The Who", "Go", "Ant"]
    linker = MentionLinker([f"Q{i}" for i in range(len(titles))], titles)
    # Only "Ant" survives: too short (It, Us, AI, Go, 1), only stopwords (The, The Who), only digits (1969).
    assert len(linker) == 1 and linker.skipped_names == 8
    assert _links(linker, "The ant in 1969 was it, the who, AI, go.") == [("Q8", "ant")]

    permissive = MentionLinker(["Q3", "Q5"], ["AI", "1969"], min_name_chars=2, skip_numeric_names=False)
    assert _links(permissive, "AI in 1969") == [("Q3", "AI"), ("Q5", "1969")]


def test_names_longer_than_max_name_tokens_are_not_indexed():
    long_title = "The Man Who Mistook His Wife for a Hat"  # 9 tokens
    assert len(MentionLinker(["Q1"], [long_title])) == 0
    assert _links(MentionLinker(["Q1"], [long_title], max_name_tokens=9), long_title) == [("Q1", long_title)]


def test_shared_names_keep_all_candidates_title_before_alias_then_row():
    linker = MentionLinker(
        ids=["alias-owner", "first", "second"],
        titles=["Mercury Records", "Mercury", "Mercury"],
        aliases=[["Mercury"], [], []],
    )
    mention = linker.link("Mercury rising")[0]
    # Entries titled "Mercury" beat the one that only has it as an alias; rows break the tie.
    assert mention.candidate_rows == (1, 2, 0)
    assert (mention.row_index, mention.entry_id, mention.ambiguous) == (1, "first", True)
    assert linker.candidates("MERCURY") == (1, 2, 0)
    assert linker.candidates("Venus") == ()


def test_parenthetical_qualifiers_are_optional():
    ids, titles = ["Q1", "Q2", "Q3"], ["Casablanca (film)", "Casablanca", "Play (theatre)"]
    assert _links(MentionLinker(ids, titles), "Casablanca") == [("Q2", "Casablanca")]
    assert _links(MentionLinker(ids, titles), "kids play") == []

    stripped = MentionLinker(ids, titles, strip_parenthetical=True)
    # The exact title "Casablanca" is preferred over the stripped "Casablanca (film)".
    assert stripped.candidates("Casablanca") == (1, 0)
    assert _links(stripped, "kids play") == [("Q3", "play")]


def test_from_knowledge_base_and_link_batch():
    kb = load_knowledge_base([
        {"id": "Q7259", "title": "Ada Lovelace", "text": "Mathematician.", "aliases": ["Ada King"]},
        {"id": "Q5679", "title": "Lord Byron", "text": "Poet."},
    ])
    linker = MentionLinker.from_knowledge_base(kb)
    assert linker.link_batch(["Ada King, daughter of Lord Byron.", "nothing here", ""]) == [
        [Mention(0, "Q7259", 0, 8, "Ada King", (0,)), Mention(1, "Q5679", 22, 32, "Lord Byron", (1,))],
        [],
        [],
    ]
    # A plain dataset without aliases works too, and the selected row order is what row_index refers to.
    plain = datasets.Dataset.from_dict({"id": ["a", "b"], "title": ["Lord Byron", "Ada Lovelace"]})
    assert [m.row_index for m in MentionLinker.from_knowledge_base(plain).link("Ada Lovelace")] == [1]


def test_misaligned_inputs_are_rejected():
    with pytest.raises(ValueError, match="must align: got 2 ids, 1 titles"):
        MentionLinker(["a", "b"], ["A"])


@pytest.fixture(scope="module")
def wikipedia_kb():
    return load_knowledge_base(require_shared_data("wikipedia_vital"))


@pytest.mark.realdata
def test_real_wikipedia_kb_links_known_titles(wikipedia_kb):
    linker = MentionLinker.from_knowledge_base(wikipedia_kb)
    assert len(linker) > 9_900  # nearly every title is linkable

    sentence = "Albert Einstein and Marie Curie met in Paris, near the Eiffel Tower, to discuss the Moon."
    linked = _links(linker, sentence)
    for title in ["Albert Einstein", "Marie Curie", "Paris", "Eiffel Tower", "Moon"]:
        assert (title, title) in linked
    assert all(sentence.count(surface) for _, surface in linked)


@pytest.mark.realdata
def test_real_captions_link_quickly(wikipedia_kb):
    linker = MentionLinker.from_knowledge_base(wikipedia_kb)
    with open(require_shared_data("flickr8k", "captions.csv"), newline="", encoding="utf-8") as handle:
        captions = [row["caption"] for row in csv.DictReader(handle)]
    assert len(captions) == 4_000

    started = time.perf_counter()
    mentions = linker.link_batch(captions)
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0  # about 0.7 s here: cost follows caption length, not KB size
    dog = wikipedia_kb["id"][:].index("Dog")
    assert sum(m.row_index == dog for caption in mentions for m in caption) > 500
