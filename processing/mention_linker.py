"""Link free text (captions, questions) to knowledge-base entries by exact name matching.

The linker gives weak knowledge positives (which entries a caption talks about)
and entity character spans (what to mask in pre-training). It is deliberately
simple and predictable:

* **Names.** Every entry contributes its title and aliases. A name is
  normalised to a tuple of tokens: alphanumeric runs (so punctuation and
  whitespace only separate tokens), case-folded, accents stripped
  (``"Márkó Futács"`` -> ``("marko", "futacs")``).
* **Skipped names.** Names shorter than ``min_name_chars`` characters (tokens
  joined by single spaces), names made only of stopwords (``"The"``,
  ``"It"``) or only of digits (``"1"``, years would otherwise link), and names
  longer than ``max_name_tokens`` tokens.
* **Matching.** The text is tokenised the same way, keeping each token's
  character span; scanning left to right, at each token the longest name
  starting there wins and scanning resumes after it (leftmost-longest,
  non-overlapping). The cost is about ``tokens x max_name_tokens`` dictionary
  look-ups per text, independent of KB size.
* **Ambiguity.** A name shared by several entries keeps them all in
  ``Mention.candidate_rows``; ``Mention.row_index`` is the preferred one: an
  entry whose *title* is the name beats one that only has it as an alias (or
  as a title without its parenthetical qualifier, see below); ties go to the
  lowest row. Consumers wanting clean positives can drop ``mention.ambiguous``.
* **Parenthetical qualifiers.** With ``strip_parenthetical=True`` a title such
  as ``"Casablanca (film)"`` is also matched as ``"Casablanca"``. It is off by
  default because many qualified titles are common words (``"Play (theatre)"``)
  that would link ordinary captions to the wrong entry.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["DEFAULT_STOPWORDS", "Mention", "MentionLinker", "normalise_name", "tokenise_with_spans"]

# Function words that must not be linked on their own (entries titled "The", "It", "Us", ...).
DEFAULT_STOPWORDS: frozenset[str] = frozenset(
    """
    a an the and or but nor of in on at to for from by with without into onto over under about above
    below between through during before after up down out off as than then so if is are was were be
    been being am do does did have has had having i me my we us our you your he him his she her it
    its they them their this that these those there here what which who whom whose when where why how
    all any both each few more most other some such no not only own same too very can will just should
    now one two three also may might must would could shall yes
    """.split()
)

_TOKEN_PATTERN = re.compile(r"[^\W_]+")  # alphanumeric runs; "_" counts as punctuation
_PARENTHETICAL = re.compile(r"\s*\([^()]*\)\s*$")

# Preference of a name source when several entries share a name (lower wins).
_TITLE, _ALIAS, _STRIPPED_TITLE = 0, 1, 2


def _normalise_token(token: str) -> str:
    """Case-fold and drop combining accents, so "Café" and "cafe" match."""
    decomposed = unicodedata.normalize("NFKD", token.casefold())
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def tokenise_with_spans(text: str) -> list[tuple[str, int, int]]:
    """``(normalised token, start_char, end_char)`` for each alphanumeric run of ``text``."""
    return [(_normalise_token(match.group()), match.start(), match.end()) for match in _TOKEN_PATTERN.finditer(text)]


def normalise_name(name: str) -> tuple[str, ...]:
    """The lookup key of a name: its normalised tokens (``"Spider-Man!"`` -> ``("spider", "man")``)."""
    return tuple(token for token, _, _ in tokenise_with_spans(name))


@dataclass(frozen=True, slots=True)
class Mention:
    """A span of a text that names a knowledge entry.

    ``text[start_char:end_char] == surface``. ``row_index``/``entry_id`` are the
    preferred entry; ``candidate_rows`` holds every entry with that name,
    preferred first.
    """

    row_index: int
    entry_id: str
    start_char: int
    end_char: int
    surface: str
    candidate_rows: tuple[int, ...] = ()

    @property
    def ambiguous(self) -> bool:
        """True when several entries share the matched name."""
        return len(self.candidate_rows) > 1


class MentionLinker:
    """Finds KB entry names in free text (see the module docstring for the rules).

    Args:
        ids: entry ids, one per KB row.
        titles: entry titles, aligned with ``ids``.
        aliases: per-row alias lists (or ``None``), aligned with ``ids``.
        min_name_chars: names shorter than this (tokens joined by spaces) are not linked.
        max_name_tokens: longest name, in tokens, that is indexed; bounds the scan cost.
        stopwords: a name made only of these tokens is not linked.
        skip_numeric_names: do not link names made only of digits.
        strip_parenthetical: also index titles without a trailing ``"(...)"`` qualifier.

    Example::

        >>> linker = MentionLinker(["Q1", "Q2"], ["New York City", "York"])
        >>> [(m.entry_id, m.surface) for m in linker.link("From new york city to York.")]
        [('Q1', 'new york city'), ('Q2', 'York')]
    """

    def __init__(
        self,
        ids: Sequence[str],
        titles: Sequence[str],
        aliases: Sequence[Sequence[str] | None] | None = None,
        *,
        min_name_chars: int = 3,
        max_name_tokens: int = 8,
        stopwords: Iterable[str] = DEFAULT_STOPWORDS,
        skip_numeric_names: bool = True,
        strip_parenthetical: bool = False,
    ) -> None:
        if len(ids) != len(titles) or (aliases is not None and len(aliases) != len(ids)):
            raise ValueError(
                f"ids, titles and aliases must align: got {len(ids)} ids, {len(titles)} titles"
                + (f", {len(aliases)} alias lists" if aliases is not None else "")
            )
        self.entry_ids: list[str] = list(ids)
        self.min_name_chars = min_name_chars
        self.max_name_tokens = max_name_tokens
        self.stopwords = frozenset(_normalise_token(word) for word in stopwords)
        self.skip_numeric_names = skip_numeric_names
        self.skipped_names = 0  # names dropped by the rules above, for reporting

        # key -> {row: best source}; a dict keeps the first time a row was seen per key.
        candidates: dict[tuple[str, ...], dict[int, int]] = {}
        for row, title in enumerate(titles):
            names = [(title, _TITLE)]
            if aliases is not None:
                names += [(alias, _ALIAS) for alias in aliases[row] or ()]
            if strip_parenthetical and title:
                stripped = _PARENTHETICAL.sub("", title)
                if stripped and stripped != title:
                    names.append((stripped, _STRIPPED_TITLE))
            for name, source in names:
                key = normalise_name(name or "")
                if not self._is_linkable(key):
                    self.skipped_names += 1
                    continue
                sources = candidates.setdefault(key, {})
                sources[row] = min(source, sources.get(row, source))

        self._rows_by_name: dict[tuple[str, ...], tuple[int, ...]] = {
            key: tuple(sorted(sources, key=lambda row: (sources[row], row))) for key, sources in candidates.items()
        }
        # First tokens of all names: most text tokens start no name, and this rejects them in one look-up.
        self._first_tokens = frozenset(key[0] for key in self._rows_by_name)
        self._longest_name = max((len(key) for key in self._rows_by_name), default=0)

    @classmethod
    def from_knowledge_base(cls, knowledge_base, **options) -> "MentionLinker":
        """Build from a KB ``datasets.Dataset`` (``id``, ``title``, optional ``aliases`` columns)."""
        table = knowledge_base.with_format("arrow")  # whole columns at once, no per-row objects
        aliases = table["aliases"].to_pylist() if "aliases" in knowledge_base.column_names else None
        return cls(table["id"].to_pylist(), table["title"].to_pylist(), aliases, **options)

    def _is_linkable(self, key: tuple[str, ...]) -> bool:
        if not key or len(key) > self.max_name_tokens:
            return False
        if len(" ".join(key)) < self.min_name_chars:
            return False
        if all(token in self.stopwords for token in key):
            return False
        if self.skip_numeric_names and all(token.isdigit() for token in key):
            return False
        return True

    def __len__(self) -> int:
        """Number of distinct linkable names."""
        return len(self._rows_by_name)

    def candidates(self, name: str) -> tuple[int, ...]:
        """Rows an exact (normalised) name links to, preferred first; ``()`` when none."""
        return self._rows_by_name.get(normalise_name(name), ())

    def link(self, text: str) -> list[Mention]:
        """Mentions of KB names in ``text``, leftmost-longest and non-overlapping, in text order."""
        tokens = tokenise_with_spans(text)
        words = [token for token, _, _ in tokens]
        mentions = []
        position = 0
        while position < len(words):
            if words[position] not in self._first_tokens:
                position += 1
                continue
            longest = min(self._longest_name, len(words) - position)
            for length in range(longest, 0, -1):
                rows = self._rows_by_name.get(tuple(words[position : position + length]))
                if rows:
                    start, end = tokens[position][1], tokens[position + length - 1][2]
                    mentions.append(
                        Mention(rows[0], self.entry_ids[rows[0]], start, end, text[start:end], rows)
                    )
                    position += length
                    break
            else:
                position += 1
        return mentions

    def link_batch(self, texts: Iterable[str]) -> list[list[Mention]]:
        """:meth:`link` for each text."""
        return [self.link(text) for text in texts]
