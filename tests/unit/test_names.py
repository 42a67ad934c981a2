"""normalise_name, and 刘兵 / 刘冰 as two people."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.identifiers import normalise_name
from contracts.programme import load_default_programme


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("刘  兵", "刘兵"),
        ("刘  冰", "刘冰"),
        ("范  县", "范县"),
        ("范  县政府", "范县政府"),
        ("刘\u3000兵", "刘兵"),  # full-width (ideographic) space
        ("\u3000王俊海\u3000", "王俊海"),
        ("  孙庆伟\t\n", "孙庆伟"),
        ("赵 丽 玲", "赵丽玲"),
        ("ＡＢＣ", "ABC"),  # full-width Latin folds to ASCII
        ("ｚｈａｏ\u3000ｌｉｌｉｎｇ", "zhao liling"),
        ("Zhao Liling", "Zhao Liling"),
        ("  Zhao    Liling  ", "Zhao Liling"),
        ("Zhao\tLiling", "Zhao Liling"),
        ("\uf9d1", "\u516d"),  # CJK compatibility ideograph 六 → unified 六
        ("", ""),
        ("   ", ""),
        ("\u3000", ""),
    ],
)
def test_normalise_name(raw: str, expected: str) -> None:
    assert normalise_name(raw) == expected


def test_mixed_cjk_and_latin_keeps_a_single_space() -> None:
    assert normalise_name("王  Ｗａｎｇ") == "王 Wang"


@given(st.text())
def test_normalise_is_idempotent(raw: str) -> None:
    once = normalise_name(raw)
    assert normalise_name(once) == once


@given(st.text())
def test_normalised_names_are_nfkc_and_trimmed(raw: str) -> None:
    out = normalise_name(raw)
    assert out == out.strip()
    assert unicodedata.normalize("NFKC", out) == out
    assert "  " not in out
    assert "\u3000" not in out


@given(st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1), st.data())
def test_padding_inside_a_chinese_name_is_removed(name: str, data: st.DataObject) -> None:
    padded = "".join(ch + data.draw(st.sampled_from(["", " ", "  ", "\u3000", "\t"])) for ch in name)
    assert normalise_name(padded) == unicodedata.normalize("NFKC", name)


def test_liu_bing_and_liu_bing_are_two_people() -> None:
    programme = load_default_programme()
    qingfeng, nanle = programme.county("410922"), programme.county("410923")
    assert qingfeng is not None and nanle is not None
    assert qingfeng.name == "清丰县" and nanle.name == "南乐县"
    assert qingfeng.responsible_person.name == "刘兵"
    assert nanle.responsible_person.name == "刘冰"
    assert qingfeng.responsible_person.id != nanle.responsible_person.id
    assert qingfeng.responsible_person.id.startswith("410922-")
    assert nanle.responsible_person.id.startswith("410923-")
    # Same romanisation, so ids are anchored on the county code, not the pinyin alone.
    assert qingfeng.responsible_person.id.endswith("liu-bing")
    assert nanle.responsible_person.id.endswith("liu-bing")
    person_ids = [c.responsible_person.id for c in programme.counties]
    assert len(set(person_ids)) == len(person_ids) == 5
