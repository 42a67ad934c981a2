"""The committed JSON Schema files match the code; the example directory is valid and fictional."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.directory import DirectoryFileError, example_directory_path, load_directory
from contracts.programme import load_default_programme
from contracts.schema import SCHEMA_DIR, render_schemas


@pytest.mark.parametrize("name", sorted(render_schemas()))
def test_committed_schema_matches_the_code(name: str) -> None:
    committed = SCHEMA_DIR / name
    assert committed.exists(), f"{committed} missing: run `duban schema`"
    assert committed.read_text("utf-8") == render_schemas()[name], f"{name} drifted: run `duban schema`"


def test_example_directory_names_every_responsible_person_and_reaches_nobody() -> None:
    programme = load_default_programme()
    directory = load_directory(example_directory_path(), programme)
    for county in programme.counties:
        person = directory.person(county.responsible_person.id)
        assert person is not None and person.county_code == county.code
    # 刘兵 (清丰) and 刘冰 (南乐): two people, two numbers.
    liu_qingfeng, liu_nanle = directory.person("410922-liu-bing"), directory.person("410923-liu-bing")
    assert liu_qingfeng and liu_nanle and liu_qingfeng.mobile != liu_nanle.mobile
    assert (liu_qingfeng.name, liu_nanle.name) == ("刘兵", "刘冰")
    for person in directory.people:
        assert person.email is None or person.email.endswith("@example.org")
        assert person.mobile is None or person.mobile.startswith("+86138000")


def test_directory_errors_name_the_line(tmp_path: Path) -> None:
    text = example_directory_path().read_text("utf-8").replace('mobile: "+8613800000003"', 'mobile: "13800000003x"')
    bad = tmp_path / "dir.yaml"
    bad.write_text(text, "utf-8")
    with pytest.raises(DirectoryFileError) as caught:
        load_directory(bad)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "13800000003x" in t)
    assert caught.value.line == line and caught.value.key == "$.people[2].mobile"


def test_directory_must_match_the_programme(tmp_path: Path) -> None:
    text = example_directory_path().read_text("utf-8").replace("name: 刘冰", "name: 刘兵")
    bad = tmp_path / "dir.yaml"
    bad.write_text(text, "utf-8")
    with pytest.raises(DirectoryFileError, match="410923-liu-bing is 刘冰"):
        load_directory(bad, load_default_programme())
