"""Answer normalisation of the official VQA evaluation (https://visualqa.org/evaluation.html).

This file is the single home of the normalisation rules. It sits next to
``vqa_accuracy.py`` on purpose: ``evaluate.load`` copies a metric script into its
module cache together with the files it imports *relatively from its own folder*
(``from .vqa_normalization import ...``), and nothing else, so a sibling of the
metric folder would not be importable from the cached copy.
``training.metrics.vqa_normalize_answer`` re-exports :func:`normalize_answer`.

Rules, in the order the official script applies them:

1. newlines and tabs become spaces, outer whitespace is stripped;
2. punctuation (everything below except apostrophe and colon, which carry meaning in
   "girl's" and "2:50") is deleted when it touches a space, or when the answer
   contains a digit-comma-digit run ("1,000" -> "1000"), and replaced by a space
   otherwise ("black-and-white" -> "black and white");
3. periods are removed unless a digit follows, which keeps decimals ("2.5");
4. lower-casing, number words zero..ten (and "none") become digits, the articles
   a/an/the are dropped;
5. contractions missing their apostrophe are repaired ("dont" -> "don't").
"""

import re

__all__ = ["normalize_answer"]

# The official script's punctuation list: apostrophe, colon and period are not in it
# (periods get their own rule below).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!")

# A comma between digits marks a number written with thousands separators.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")

# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a mistyped
# look-behind that never constrains anything, so a period is removed exactly when no
# digit follows it. (The official call also passes re.UNICODE as the replacement
# count, capping it at 32 periods per answer; no real answer comes near that.)
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Contractions written without their apostrophe, as listed by the official script.
# Left out: its capitalised keys ("Im", "Ive", "Id've", "I'dve"), which can never fire
# because the text is lower-cased first, and its identity entries ("let's", "she's").
# The official table maps "somebody'd" to "somebodyd" (reversed); here "somebodyd"
# maps to "somebody'd". Both directions merge the two spellings into one, so which
# answers match is unchanged.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebodyd": "somebody'd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _process_punctuation(text: str) -> str:
    """Rules 2 and 3: punctuation marks and periods."""
    # Decided on the input text, not on the partly cleaned one, as the official script does.
    is_number_with_commas = _DIGIT_COMMA_DIGIT.search(text) is not None
    cleaned = text
    for mark in _PUNCTUATION:
        if is_number_with_commas or (mark + " ") in text or (" " + mark) in text:
            cleaned = cleaned.replace(mark, "")
        else:
            cleaned = cleaned.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", cleaned)


def _process_words(text: str) -> str:
    """Rules 4 and 5: lower-casing, number words, articles, contractions."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Normalise a VQA answer the way the official VQA evaluation does.

    Examples:
        >>> normalize_answer("Two dogs.")
        '2 dogs'
        >>> normalize_answer("1,000")
        '1000'
        >>> normalize_answer("The Black-and-White cat")
        'black and white cat'
        >>> normalize_answer("dont know")
        "don't know"
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_words(_process_punctuation(text))
