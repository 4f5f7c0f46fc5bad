"""fhirbridge.identity.names: folding and comparing person names (FHIR R4 HumanName) as
IHE PDQm demographic evidence."""

from __future__ import annotations

import pytest

from fhirbridge.identity.model import Name
from fhirbridge.identity.names import (
    NameMatch,
    best_name_match,
    compare_given,
    compare_names,
    fold,
    rank,
    same_text,
    words,
)


@pytest.mark.parametrize(("text", "key"), [
    ("José", "jose"),
    ("MÜLLER", "muller"),
    ("O'Brien", "obrien"),
    ("O’Brien", "obrien"),
    ("O Brien", "obrien"),
    ("O\u02bcBrien", "obrien"),  # modifier letter apostrophe
    ("Smith-Jones", "smithjones"),
    ("Smith\u2010Jones", "smithjones"),  # Unicode hyphen
    ("St. John", "stjohn"),
    ("  Anna   Maria ", "annamaria"),
    ("Strauß", "strauss"),
    ("Łukasz", "lukasz"),
    ("Søren", "soren"),
    ("Nguyễn", "nguyen"),
    ("ＪＯＳＥ", "jose"),  # full-width Latin
    ("ﾔﾏﾀﾞ", "ヤマダ"),  # half-width katakana with voicing mark
    ("やまだ", "ヤマダ"),  # hiragana folds to katakana
    ("山田　太郎", "山田太郎"),  # ideographic space
    ("ジョン・スミス", "ジョンスミス"),
    ("Иванов", "иванов"),
])
def test_fold(text: str, key: str) -> None:
    assert fold(text) == key


def test_fold_keeps_non_latin_marks() -> None:
    assert fold("ダ") != fold("タ")  # the dakuten is part of the kana, not an accent
    assert fold("ﾀﾞ") == fold("ダ")
    assert fold("タロー") != fold("タロ")  # the prolonged sound mark is significant
    assert fold("й") != fold("и")  # Cyrillic short i is its own letter


def test_german_spelling() -> None:
    assert fold("Müller", german=True) == "mueller"
    assert same_text("Müller", "Mueller")
    assert same_text("Muller", "Müller")
    assert not same_text("Michael", "Michal")  # no ae→a folding outside umlauts


def test_words_split_on_spaces_not_hyphens() -> None:
    assert words("Jean-Pierre Marie") == ("jeanpierre", "marie")
    assert words("山田　太郎") == ("山田", "太郎")


@pytest.mark.parametrize(("a", "b", "expected"), [
    (Name("Müller", ("José",)), Name("Müller", ("José",)), NameMatch.EXACT),
    (Name("Müller", ("José", "María")), Name("MULLER", ("JOSE", "MARIA")),
     NameMatch.NORMALISED_EQUAL),
    (Name("Müller", ("José", "María")), Name("MULLER", ("JOSE",)), NameMatch.NORMALISED_EQUAL),
    (Name("Mueller", ("Jose",)), Name("Müller", ("José",)), NameMatch.NORMALISED_EQUAL),
    (Name("O'Brien", ("Siobhán",)), Name("O Brien", ("Siobhan",)), NameMatch.NORMALISED_EQUAL),
    (Name("Smith-Jones", ("Peter",)), Name("Smith Jones", ("Peter",)),
     NameMatch.NORMALISED_EQUAL),
    (Name("山田", ("太郎",)), Name("山田　太郎", ()), NameMatch.NORMALISED_EQUAL),
    (Name("ヤマダ", ("タロウ",)), Name("ﾔﾏﾀﾞ", ("ﾀﾛｳ",)), NameMatch.NORMALISED_EQUAL),
    (Name("Yamada", ("Taro",)), Name("Taro", ("Yamada",)), NameMatch.SWAPPED),
    (Name("山田", ("太郎",)), Name("太郎", ("山田",)), NameMatch.SWAPPED),
    (Name("Müller", ("José", "María")), Name("José María", ("Müller",)), NameMatch.SWAPPED),
    (Name("Smith", ("Anna",)), Name("Smith", ("Emma",)), NameMatch.DIFFERENT),
    (Name("Smith", ("Anna",)), Name("Smith", ()), NameMatch.DIFFERENT),
    (Name("Smith", ("Anna",)), Name("Smyth", ("Anna",)), NameMatch.DIFFERENT),
    (Name("Müller", ("José", "María")), Name("Müller", ("José", "Luis")), NameMatch.DIFFERENT),
    (Name("Müller", ("José",)), Name("Müller", ("J.",)), NameMatch.DIFFERENT),
    (Name("Smith", ("John",), suffix="Jr."), Name("Smith", ("John",), suffix="Sr"),
     NameMatch.DIFFERENT),
    (Name("ヤマダ", ("タロウ",)), Name("ヤマタ", ("タロウ",)), NameMatch.DIFFERENT),
    (Name("", ()), Name("", ()), NameMatch.DIFFERENT),
])
def test_compare_names(a: Name, b: Name, expected: NameMatch) -> None:
    assert compare_names(a, b) is expected
    assert compare_names(b, a) is expected


def test_prefix_ignored_generation_optional() -> None:
    assert compare_names(Name("Smith", ("John",), prefix="Dr."),
                         Name("Smith", ("John",))) is NameMatch.EXACT
    assert compare_names(Name("Smith", ("John",), suffix="Jr."),
                         Name("Smith", ("John",))) is NameMatch.EXACT
    assert compare_names(Name("Smith", ("John",), suffix="Jr."),
                         Name("SMITH", ("John",), suffix="junior")) is NameMatch.NORMALISED_EQUAL


@pytest.mark.parametrize(("a", "b", "agree"), [
    (("José", "María"), ("José",), True),
    (("José",), ("José", "María"), True),
    (("José", "M."), ("José", "María"), True),
    (("Mary Ann",), ("Mary", "Ann"), True),
    (("Mary", "Ann", "Lou"), ("Mary", "Lou"), True),
    (("Mary", "Lou", "Ann"), ("Mary", "Ann", "Lou"), False),  # middle names out of order
    (("José", "Luis"), ("José", "María"), False),
    (("Jean",), ("Jean-Pierre",), False),
    (("María", "José"), ("José", "María"), False),  # the first given must agree
    ((), ("Anna",), False),
    ((), (), True),
])
def test_compare_given(a: tuple[str, ...], b: tuple[str, ...], agree: bool) -> None:
    assert compare_given(a, b) is agree


def test_best_name_match_over_all_names() -> None:
    record = (Name("Schmidt", ("Karin",)), Name("Weber", ("Karin",)))
    assert best_name_match((Name("WEBER", ("Karin",)),), record) is NameMatch.NORMALISED_EQUAL
    assert best_name_match((Name("Weber", ("Karin",)),), record) is NameMatch.EXACT
    assert best_name_match((), record) is NameMatch.DIFFERENT
    assert best_name_match(record, ()) is NameMatch.DIFFERENT
    assert [rank(m) for m in NameMatch] == [0, 1, 2, 3]
