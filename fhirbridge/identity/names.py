"""Person-name comparison for identity evidence: folding case, accents, punctuation and width.
Compares FHIR R4 HumanName values as IHE PDQm demographic evidence; never used to find a patient.

Folding (see `fold`): Unicode NFKC (full-/half-width forms, ligatures), case folding, accents
stripped from Latin letters only (NFKD, combining marks dropped — Japanese dakuten and other
non-Latin marks are kept, so ダ ≠ タ), hiragana folded to katakana, and spaces, hyphens,
apostrophes, periods and other punctuation dropped (O'Brien = OBrien = O Brien;
Smith-Jones = Smith Jones). German umlauts also compare equal to their ae/oe/ue spelling.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from fhirbridge.identity.model import Name


class NameMatch(Enum):
    """How two names compare, best first."""

    EXACT = "exact"  # same strings
    NORMALISED_EQUAL = "normalised-equal"  # same after folding; a middle name may be missing
    SWAPPED = "swapped"  # same after folding with given and family names swapped
    DIFFERENT = "different"


_RANK = {NameMatch.EXACT: 0, NameMatch.NORMALISED_EQUAL: 1, NameMatch.SWAPPED: 2,
         NameMatch.DIFFERENT: 3}

# Latin letters NFKD does not decompose, and their usual ASCII spelling.
_LATIN_LETTERS = {"ø": "o", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d", "ð": "d", "þ": "th",
                  "ı": "i", "ħ": "h", "ŧ": "t", "ŋ": "n"}
_GERMAN = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue"})
# Apostrophe-like letters (Unicode category Lm) that are still punctuation in names.
_APOSTROPHES = {"\u02bc", "\u02bb", "\u02b9", "\u02bd"}
_WORD_SEPARATORS = re.compile(r"[\s\u30fb]+")  # spaces (incl. ideographic) and katakana ・
_GENERATIONS = {"jr", "junior", "sr", "senior", "ii", "iii", "iv", "2nd", "3rd", "4th"}


def fold(text: str, *, german: bool = False) -> str:
    """The comparison key of a name part (see the module docstring). `german=True` spells
    ä/ö/ü as ae/oe/ue first, so that Müller also compares equal to Mueller."""
    t = unicodedata.normalize("NFKC", text).casefold()
    if german:
        t = t.translate(_GERMAN)
    out: list[str] = []
    base_is_latin = False
    for ch in unicodedata.normalize("NFKD", t):
        if unicodedata.combining(ch):
            if not base_is_latin:
                out.append(ch)  # e.g. the dakuten of ダ: part of the letter
            continue
        base_is_latin = "LATIN" in unicodedata.name(ch, "")
        out.append(_LATIN_LETTERS.get(ch, ch))
    t = unicodedata.normalize("NFC", "".join(out))
    return "".join(_kana(ch) for ch in t if _significant(ch))


def words(text: str) -> tuple[str, ...]:
    """Folded words of a name part, split at spaces (a hyphen joins: Jean-Pierre is one)."""
    return _split_fold(text, german=False)


def same_text(a: str, b: str) -> bool:
    """Two name parts are equal after folding (either side may use the German spelling)."""
    return bool(_variants(a) & _variants(b))


def compare_given(a: Sequence[str], b: Sequence[str]) -> bool:
    """Given names agree: the first given name is the same; middle names may be missing on
    one side (or given as an initial), and those present must appear in the same order."""
    views_a = {_given_words(a, german) for german in (False, True)}
    views_b = {_given_words(b, german) for german in (False, True)}
    return any(_given_ok(x, y) for x in views_a for y in views_b)


def compare_names(a: Name, b: Name) -> NameMatch:
    """Compare two names; prefixes (titles) are ignored, generational suffixes (Jr, Sr, III)
    must not contradict."""
    if _exact(a, b):
        return NameMatch.EXACT
    best = NameMatch.DIFFERENT
    for fa in _views(a):
        for fb in _views(b):
            result = _compare_folded(fa, fb)
            if _RANK[result] < _RANK[best]:
                best = result
    return best


def best_name_match(reported: Sequence[Name], record: Sequence[Name]) -> NameMatch:
    """The best comparison between any reported name and any of the record's names
    (official, usual, maiden, old, other scripts…). DIFFERENT when either side has none."""
    best = NameMatch.DIFFERENT
    for a in reported:
        for b in record:
            result = compare_names(a, b)
            if _RANK[result] < _RANK[best]:
                best = result
    return best


def rank(match: NameMatch) -> int:
    """0 for EXACT … 3 for DIFFERENT."""
    return _RANK[match]


# -- internals -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Folded:
    family: str
    given: tuple[str, ...]
    generation: str


def _significant(ch: str) -> bool:
    if ch in _APOSTROPHES:
        return False
    cat = unicodedata.category(ch)
    return not (cat[0] in "PZ" or cat in ("Cc", "Cf", "Sk"))


def _kana(ch: str) -> str:
    """Hiragana → katakana (both spell the same reading)."""
    cp = ord(ch)
    if 0x3041 <= cp <= 0x3096 or cp in (0x309D, 0x309E):
        return chr(cp + 0x60)
    return ch


def _variants(text: str) -> set[str]:
    return {fold(text), fold(text, german=True)}


def _views(name: Name) -> list[_Folded]:
    """The name folded plainly and with German umlaut spelling (one view when identical)."""
    gen = _generation(name.suffix)
    views: list[_Folded] = []
    for german in (False, True):
        view = _Folded(fold(name.family, german=german), _given_words(name.given, german), gen)
        if view not in views:
            views.append(view)
    return views


def _given_words(given: Sequence[str], german: bool) -> tuple[str, ...]:
    return tuple(w for g in given for w in _split_fold(g, german=german))


def _split_fold(text: str, *, german: bool) -> tuple[str, ...]:
    spaced = _WORD_SEPARATORS.split(unicodedata.normalize("NFKC", text))
    return tuple(w for w in (fold(s, german=german) for s in spaced) if w)


def _generation(suffix: str) -> str:
    for word in words(suffix):
        if word in _GENERATIONS:
            return {"junior": "jr", "senior": "sr", "2nd": "ii", "3rd": "iii",
                    "4th": "iv"}.get(word, word)
    return ""


def _exact(a: Name, b: Name) -> bool:
    if not (a.family.strip() or a.given):
        return False
    return (a.family.strip() == b.family.strip()
            and tuple(g.strip() for g in a.given) == tuple(g.strip() for g in b.given)
            and _generations_agree(_generation(a.suffix), _generation(b.suffix)))


def _generations_agree(a: str, b: str) -> bool:
    return not a or not b or a == b


def _compare_folded(a: _Folded, b: _Folded) -> NameMatch:
    if not _generations_agree(a.generation, b.generation):
        return NameMatch.DIFFERENT
    if not (a.family or a.given) or not (b.family or b.given):
        return NameMatch.DIFFERENT
    if a.family == b.family and _given_ok(a.given, b.given):
        return NameMatch.NORMALISED_EQUAL
    # One side wrote the whole name in one field ("山田 太郎" as family, no given).
    for whole, other in ((a, b), (b, a)):
        if whole.family and not whole.given and other.family and other.given:
            first, all_given = other.given[0], "".join(other.given)
            if whole.family in (other.family + first, other.family + all_given):
                return NameMatch.NORMALISED_EQUAL
            if whole.family in (first + other.family, all_given + other.family):
                return NameMatch.SWAPPED
    # Given and family swapped between the fields.
    if (a.family and b.family and a.given and b.given
            and a.family in (b.given[0], "".join(b.given))
            and b.family in (a.given[0], "".join(a.given))):
        return NameMatch.SWAPPED
    return NameMatch.DIFFERENT


def _given_ok(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    if not a and not b:
        return True
    if not a or not b:
        return False  # a first given name that is absent does not agree
    if "".join(a) == "".join(b):
        return True  # "Mary Ann" = "MaryAnn" = ("Mary", "Ann")
    if a[0] != b[0]:
        return False
    short, long = sorted((a[1:], b[1:]), key=len)
    pos = 0
    for word in short:
        while pos < len(long) and not _same_middle(word, long[pos]):
            pos += 1
        if pos == len(long):
            return False
        pos += 1
    return True


def _same_middle(a: str, b: str) -> bool:
    """Middle names agree when equal, or when one is the (ASCII letter) initial of the other."""
    if a == b:
        return True
    for initial, full in ((a, b), (b, a)):
        if len(initial) == 1 and initial.isascii() and initial.isalpha() and full[:1] == initial:
            return True
    return False
