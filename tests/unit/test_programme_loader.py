"""The programme file loader: the shipped programme, and every kind of error pointing home.

Bad files are made by editing the shipped YAML text, so line numbers mean what they say; the
expected line is found by searching the text that was written.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from contracts.programme import (
    Decider,
    Programme,
    ProgrammeFileError,
    default_programme_path,
    load_default_programme,
    load_programme,
)

SHIPPED = default_programme_path().read_text(encoding="utf-8")


def edited(old: str, new: str, *, count: int = 1) -> str:
    """The shipped text with ``old`` (which must occur exactly ``count`` times) replaced."""
    assert SHIPPED.count(old) == count, f"{old!r} occurs {SHIPPED.count(old)} times"
    return SHIPPED.replace(old, new)


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line of the ``occurrence``-th line containing ``needle``."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) >= occurrence, f"{needle!r} found {len(hits)} times"
    return hits[occurrence - 1]


def load_text(tmp_path: Path, text: str) -> Programme:
    path = tmp_path / "programme.yaml"
    path.write_text(text, encoding="utf-8")
    return load_programme(path)


def error_of(tmp_path: Path, text: str) -> ProgrammeFileError:
    with pytest.raises(ProgrammeFileError) as info:
        load_text(tmp_path, text)
    err = info.value
    # Whatever is wrong, the message names the file (and the line when there is one).
    assert str(tmp_path / "programme.yaml") in str(err)
    if err.line is not None:
        assert f"programme.yaml:{err.line}:" in str(err)
    return err


# -- the shipped programme -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def programme() -> Programme:
    return load_default_programme()


def test_shipped_programme_identity(programme: Programme) -> None:
    assert programme.format == "duban.programme/v1"
    assert programme.id == "puyang-2017-13"
    assert programme.programme.document_number == "濮政办〔2017〕13号"
    assert programme.programme.timezone == "Asia/Shanghai"


def test_shipped_programme_has_nine_milestones_in_three_phases(programme: Programme) -> None:
    assert [ph.id for ph in programme.phases] == ["1", "2", "3"]
    assert [m.id for m in programme.milestones] == [
        "1.1", "1.2", "1.3", "2.1", "2.2", "2.3", "3.1", "3.2", "3.3",
    ]  # fmt: skip
    assert [m.phase for m in programme.milestones] == ["1"] * 3 + ["2"] * 3 + ["3"] * 3


def test_shipped_deadlines_are_those_of_the_ledger(programme: Programme) -> None:
    assert {m.id: m.deadline for m in programme.milestones} == {
        "1.1": dt.date(2017, 3, 31),
        "1.2": dt.date(2017, 4, 30),
        "1.3": dt.date(2017, 6, 30),
        "2.1": dt.date(2017, 7, 31),
        "2.2": dt.date(2017, 8, 31),
        "2.3": dt.date(2017, 11, 30),
        "3.1": dt.date(2017, 12, 31),
        "3.2": dt.date(2018, 7, 31),
        "3.3": dt.date(2018, 10, 31),
    }


def test_shipped_completion_modes(programme: Programme) -> None:
    how = {m.id: m.completed_by for m in programme.milestones}
    assert how["1.2"] == "review:provincial_plan_review"
    assert how["3.1"] == "trial_operation_started"
    assert how["3.2"] == "review:pre_acceptance"
    assert how["3.3"] == "review:formal_acceptance"
    assert {k for k, v in how.items() if v == "county"} == {"1.1", "1.3", "2.1", "2.2", "2.3"}
    m13 = programme.milestone("1.3")
    assert m13 is not None and m13.step("tender_published") is not None


def test_shipped_reviews_and_their_deciders(programme: Programme) -> None:
    assert {r.kind: r.decided_by for r in programme.reviews} == {
        "plan_pre_review": Decider.CITY,
        "tender_pre_review": Decider.CITY,
        "provincial_plan_review": Decider.PROVINCE,
        "self_acceptance": Decider.NONE,
        "pre_acceptance": Decider.PROVINCE,
        "formal_acceptance": Decider.PROVINCE,
    }
    assert len(programme.rules) == 9


def test_shipped_counties_in_notice_order_with_normalised_names(programme: Programme) -> None:
    assert [c.code for c in programme.counties] == ["410928", "410922", "410923", "410926", "410927"]
    assert [c.name for c in programme.counties] == ["濮阳县", "清丰县", "南乐县", "范县", "台前县"]
    assert [c.responsible_person.name for c in programme.counties] == [
        "孙庆伟", "刘兵", "刘冰", "赵丽玲", "王俊海",
    ]  # fmt: skip
    fan = programme.county("410926")
    assert fan is not None
    assert "范  县" in SHIPPED  # the file keeps the ledger's padding …
    assert (fan.name, fan.responsible_unit) == ("范县", "范县政府")  # … the loader removes it
    assert [c.responsible_unit for c in programme.counties] == [
        "濮阳县政府", "清丰县政府", "南乐县政府", "范县政府", "台前县政府",
    ]  # fmt: skip


def test_shipped_progress_table_default(programme: Programme) -> None:
    table = programme.progress_table
    assert (table.rhythm, table.due_day_of_following_month, table.is_default) == ("monthly", 5, True)
    assert (table.first_period, table.last_period) == ("2017-03", "2018-10")


def test_another_programme_loads_from_data_alone(tmp_path: Path) -> None:
    text = edited("id: puyang-2017-13", "id: other-city-2019").replace("deadline: 2017-03-31", "deadline: 2019-05-31")
    other = load_text(tmp_path, text)
    assert other.id == "other-city-2019"
    m11 = other.milestone("1.1")
    assert m11 is not None and m11.deadline == dt.date(2019, 5, 31)


def test_loader_accepts_a_str_path(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(SHIPPED, encoding="utf-8")
    assert load_programme(str(path)).id == "puyang-2017-13"


# -- errors: the file itself ---------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProgrammeFileError) as info:
        load_programme(tmp_path / "absent.yaml")
    assert (info.value.line, info.value.key) == (None, None)
    assert "file not found" in info.value.message
    assert "absent.yaml" in str(info.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    err = error_of(tmp_path, text)
    assert (err.line, err.key) == (None, None)
    assert "empty" in err.message


def test_non_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "programme.yaml"
    path.write_bytes(SHIPPED.encode("gb18030"))
    with pytest.raises(ProgrammeFileError) as info:
        load_programme(path)
    assert "not UTF-8" in info.value.message
    assert info.value.line is None


def test_yaml_syntax_error_names_its_line(tmp_path: Path) -> None:
    text = edited("    title: 成立建设工作机构", "    title: 成立: 建设工作机构")
    err = error_of(tmp_path, text)
    assert err.line == line_of(text, "成立: 建设工作机构")
    assert err.message.startswith("not valid YAML")


def test_unclosed_flow_mapping_points_at_or_just_after_it(tmp_path: Path) -> None:
    text = edited('  - {id: "2", name: 项目实施阶段}', '  - {id: "2", name: 项目实施阶段')
    err = error_of(tmp_path, text)
    broken = line_of(text, "项目实施阶段")
    assert err.line in (broken, broken + 1)
    assert "not valid YAML" in err.message


def test_duplicate_key_in_a_mapping_names_the_second_key(tmp_path: Path) -> None:
    text = edited("    deadline_text: 2017年6月底完成\n", "    deadline_text: 2017年6月底完成\n    title: 又一个\n")
    err = error_of(tmp_path, text)
    assert err.line == line_of(text, "title: 又一个")
    assert "'title' appears twice" in err.message


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    err = error_of(tmp_path, "- just\n- a list\n")
    assert "object" in err.message.lower()


# -- errors: types -------------------------------------------------------------------------------
def test_unquoted_county_code_is_refused_at_its_line(tmp_path: Path) -> None:
    text = edited('code: "410928"', "code: 410928")
    err = error_of(tmp_path, text)
    assert err.key == "$.counties[0].code"
    assert err.line == line_of(text, "code: 410928")
    assert "Expected `str`, got `int`" in err.message


def test_unquoted_milestone_id_is_refused(tmp_path: Path) -> None:
    text = edited('  - id: "2.2"', "  - id: 2.2")
    err = error_of(tmp_path, text)
    assert err.key == "$.milestones[4].id"
    assert err.line == line_of(text, "  - id: 2.2")
    assert "got `float`" in err.message


@pytest.mark.parametrize("bad", ['"2017-04-31"', "end of April", '"2017/04/30"'])
def test_bad_date_string_names_the_deadline(tmp_path: Path, bad: str) -> None:
    text = edited("deadline: 2017-04-30", f"deadline: {bad}")
    err = error_of(tmp_path, text)
    assert err.key == "$.milestones[1].deadline"
    assert err.line == line_of(text, f"deadline: {bad}")
    assert "date" in err.message.lower()


def test_unquoted_impossible_date_is_a_programme_file_error(tmp_path: Path) -> None:
    text = edited("deadline: 2017-04-30", "deadline: 2017-04-31")
    err = error_of(tmp_path, text)
    assert err.line == line_of(text, "deadline: 2017-04-31")
    assert "2017-04-31" in err.message or "date" in err.message.lower()


def test_unknown_key_in_a_milestone_names_the_milestone_and_the_key(tmp_path: Path) -> None:
    text = edited("    deadline_text: 2017年6月底完成\n", "    dedline_text: 2017年6月底完成\n")
    err = error_of(tmp_path, text)
    assert err.key == "$.milestones[2]"
    # The milestone's first line, or (better) the line of the typo itself.
    assert err.line in (line_of(text, '  - id: "1.3"'), line_of(text, "dedline_text"))
    assert "unknown field `dedline_text`" in err.message


def test_missing_required_key_names_the_milestone(tmp_path: Path) -> None:
    text = edited("    deadline: 2017-07-31\n", "")
    err = error_of(tmp_path, text)
    assert err.key == "$.milestones[3]"
    assert err.line == line_of(text, '  - id: "2.1"')
    assert "missing required field `deadline`" in err.message


def test_missing_top_level_section(tmp_path: Path) -> None:
    start = SHIPPED.index("progress_table:\n")
    end = SHIPPED.index("# counties:")
    err = error_of(tmp_path, SHIPPED[:start] + SHIPPED[end:])
    assert err.key is None  # the root: msgspec gives no path
    assert "missing required field `progress_table`" in err.message


def test_out_of_range_number(tmp_path: Path) -> None:
    text = edited("due_day_of_following_month: 5", "due_day_of_following_month: 31")
    err = error_of(tmp_path, text)
    assert err.key == "$.progress_table.due_day_of_following_month"
    assert err.line == line_of(text, "due_day_of_following_month: 31")


# -- errors: cross references --------------------------------------------------------------------
def test_wrong_format(tmp_path: Path) -> None:
    text = edited("format: duban.programme/v1", "format: duban.programme/v2")
    err = error_of(tmp_path, text)
    assert err.key == "$.format"
    assert err.line == line_of(text, "format: duban.programme/v2")
    assert "duban.programme/v1" in err.message and "duban.programme/v2" in err.message


def test_milestone_with_unknown_phase(tmp_path: Path) -> None:
    text = edited('    phase: "3"\n    title: 系统预验收', '    phase: "4"\n    title: 系统预验收')
    err = error_of(tmp_path, text)
    assert err.key == "$.milestones[7].phase"
    assert err.line == line_of(text, 'phase: "4"')
    assert "unknown phase '4'" in err.message


def test_completed_by_unknown_review_kind(tmp_path: Path) -> None:
    text = edited("completed_by: review:pre_acceptance", "completed_by: review:pre_acceptence")
    err = error_of(tmp_path, text)
    assert err.key == "$.milestones[7].completed_by"
    assert err.line == line_of(text, "review:pre_acceptence")
    assert "pre_acceptence" in err.message


def test_completed_by_unknown_mode(tmp_path: Path) -> None:
    text = edited("completed_by: trial_operation_started", "completed_by: trial")
    err = error_of(tmp_path, text)
    assert err.key == "$.milestones[6].completed_by"
    assert err.line == line_of(text, "completed_by: trial")


def test_rule_requiring_unknown_review_kind(tmp_path: Path) -> None:
    text = edited("requires: {review_passed: tender_pre_review}", "requires: {review_passed: tender_prereview}")
    err = error_of(tmp_path, text)
    assert err.key == "$.rules[1].requires.review_passed"
    assert err.line == line_of(text, "tender_prereview")
    assert "unknown review kind 'tender_prereview'" in err.message


def test_rule_triggered_by_unknown_review_kind(tmp_path: Path) -> None:
    text = edited("when: {review_requested: provincial_plan_review}", "when: {review_requested: province_review}")
    err = error_of(tmp_path, text)
    assert err.key == "$.rules[0].when.review_requested"
    assert err.line == line_of(text, "province_review}")


def test_rule_triggered_by_unknown_step(tmp_path: Path) -> None:
    text = edited('step_done: "1.3/tender_published"', 'step_done: "1.3/tender_issued"')
    err = error_of(tmp_path, text)
    assert err.key == "$.rules[1].when.step_done"
    assert err.line == line_of(text, "1.3/tender_issued")
    assert "unknown milestone/step '1.3/tender_issued'" in err.message


def test_rule_triggered_by_step_of_unknown_milestone(tmp_path: Path) -> None:
    text = edited('step_done: "1.3/tender_published"', 'step_done: "1.4/tender_published"')
    err = error_of(tmp_path, text)
    assert err.key == "$.rules[1].when.step_done"
    assert "1.4/tender_published" in err.message


def test_rule_triggered_by_unknown_milestone(tmp_path: Path) -> None:
    text = edited('when: {milestone_completed: ["2.1", "2.2", "2.3"]}', 'when: {milestone_completed: ["2.1", "2.4"]}')
    err = error_of(tmp_path, text)
    assert err.key == "$.rules[3].when.milestone_completed"
    assert err.line == line_of(text, '"2.4"')
    assert "unknown milestone '2.4'" in err.message


def test_rule_requiring_unknown_milestone(tmp_path: Path) -> None:
    text = edited('requires: {milestone_completed: "2.3"}', 'requires: {milestone_completed: "2.9"}')
    err = error_of(tmp_path, text)
    assert err.key == "$.rules[4].requires.milestone_completed"
    assert err.line == line_of(text, '"2.9"')


def test_rule_with_two_triggers(tmp_path: Path) -> None:
    text = edited(
        "when: {trial_operation_started: true}",
        'when: {trial_operation_started: true, step_done: "1.3/tender_published"}',
    )
    err = error_of(tmp_path, text)
    assert err.key == "$.rules[4].when"
    assert "exactly one trigger" in err.message


def test_rule_with_no_requirement(tmp_path: Path) -> None:
    text = edited("requires: {trial_operation_months: 6}", "requires: {}")
    err = error_of(tmp_path, text)
    assert err.key == "$.rules[6].requires"
    assert err.line == line_of(text, "requires: {}")
    assert "exactly one requirement" in err.message


def test_review_for_unknown_milestone(tmp_path: Path) -> None:
    text = edited('decided_by: none, milestone: "3.2"', 'decided_by: none, milestone: "3.4"')
    err = error_of(tmp_path, text)
    assert err.key == "$.reviews[3].milestone"
    assert err.line == line_of(text, '"3.4"')


def test_duplicated_milestone_id(tmp_path: Path) -> None:
    text = edited('  - id: "2.2"', '  - id: "2.1"')
    err = error_of(tmp_path, text)
    assert err.key is not None and err.key.startswith("$.milestones[") and err.key.endswith("].id")
    index = int(err.key.removeprefix("$.milestones[").removesuffix("].id"))
    assert index in (3, 4)
    assert err.line == line_of(text, '  - id: "2.1"', occurrence=index - 2)
    assert "milestone id '2.1' appears twice" in err.message


def test_duplicated_county_code(tmp_path: Path) -> None:
    text = edited('code: "410927"', 'code: "410922"')
    err = error_of(tmp_path, text)
    assert err.key in ("$.counties[1].code", "$.counties[4].code")
    occurrence = 1 if err.key == "$.counties[1].code" else 2
    assert err.line == line_of(text, 'code: "410922"', occurrence=occurrence)
    assert "county code '410922' appears twice" in err.message


def test_duplicated_person_id(tmp_path: Path) -> None:
    # 刘兵 and 刘冰 share a romanisation; their ids must not collide.
    text = edited("{id: 410923-liu-bing, name: 刘  冰}", "{id: 410922-liu-bing, name: 刘  冰}")
    err = error_of(tmp_path, text)
    assert err.key in ("$.counties[1].responsible_person.id", "$.counties[2].responsible_person.id")
    assert "person id '410922-liu-bing' appears twice" in err.message


def test_duplicated_phase_id_names_a_phase_with_that_id(tmp_path: Path) -> None:
    text = edited('  - {id: "3", name: 系统运行阶段}', '  - {id: "2", name: 系统运行阶段}')
    err = error_of(tmp_path, text)
    assert "phase id '2' appears twice" in err.message
    assert err.key in ("$.phases[1].id", "$.phases[2].id")
    assert err.line in (line_of(text, '{id: "2"'), line_of(text, '{id: "2"', occurrence=2))


def test_duplicated_step_id(tmp_path: Path) -> None:
    text = edited("{id: proposal_written,", "{id: designer_selected,")
    err = error_of(tmp_path, text)
    assert err.key == "$.milestones[1].steps"
    assert "step id 'designer_selected' appears twice" in err.message


def test_duplicated_rule_id(tmp_path: Path) -> None:
    text = edited("  - id: tender-pre-review-before-tender", "  - id: plan-pre-review-before-provincial-review")
    err = error_of(tmp_path, text)
    assert err.key == "$.rules[0].id"
    assert "appears twice" in err.message


def test_last_period_before_first(tmp_path: Path) -> None:
    text = edited('last_period: "2018-10"', 'last_period: "2016-10"')
    err = error_of(tmp_path, text)
    assert err.key == "$.progress_table.last_period"
    assert err.line == line_of(text, 'last_period: "2016-10"')


def test_no_counties(tmp_path: Path) -> None:
    text = SHIPPED[: SHIPPED.index("counties:\n  - code")] + "counties: []\n"
    err = error_of(tmp_path, text)
    assert err.key == "$.counties"
    assert "at least one county" in err.message


def test_text_longer_than_any_message_carries_is_refused_where_it_is(tmp_path: Path) -> None:
    # A rule's source has no bound of its own; no text in a data file may exceed the longest
    # note an event carries.
    text = edited("    source: 第三条（一）（二）", "    source: " + "条" * 2001)
    err = error_of(tmp_path, text)
    assert err.key == "$.rules[0].source" and err.line == line_of(text, "条" * 2001)
    assert "2,001 characters" in str(err)
    assert load_text(tmp_path, edited("    source: 第三条（一）（二）", "    source: " + "条" * 2000))


def test_aliases_expanding_to_too_many_values_are_refused(tmp_path: Path) -> None:
    # A thousand references to a thousand references to a thousand values: a few kilobytes of
    # YAML, a billion values for the steps after loading.
    bomb = (
        "\nx-a: &a [" + ", ".join(["1"] * 1000) + "]"
        "\nx-b: &b [" + ", ".join(["*a"] * 1000) + "]"
        "\nx-c: [" + ", ".join(["*b"] * 1000) + "]\n"
    )
    err = error_of(tmp_path, SHIPPED + bomb)
    assert "more than 1,000,000 values once its aliases are expanded" in err.message


def test_a_value_containing_itself_through_an_alias_is_refused(tmp_path: Path) -> None:
    err = error_of(tmp_path, SHIPPED + "\nx-loop: &loop [1, [2, *loop]]\n")
    assert "contains itself through an alias" in err.message


def test_aliases_of_a_reasonable_size_still_load(tmp_path: Path) -> None:
    text = edited('  - id: "1.1"\n    phase: "1"', '  - id: "1.1"\n    phase: &first "1"')
    text = text.replace('  - id: "1.2"\n    phase: "1"', '  - id: "1.2"\n    phase: *first')
    assert "*first" in text
    programme = load_text(tmp_path, text)
    assert [m.phase for m in programme.milestones[:2]] == ["1", "1"]
