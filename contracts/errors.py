"""Stable error codes of refused submissions, each with its Chinese and English text.

Codes are part of the contract: county systems branch on them. Add codes; never rename one.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    UNKNOWN_PROGRAMME = "unknown_programme"
    UNKNOWN_COUNTY = "unknown_county"
    UNKNOWN_MILESTONE = "unknown_milestone"
    UNKNOWN_REVIEW_KIND = "unknown_review_kind"
    UNKNOWN_STEP = "unknown_step"
    UNKNOWN_SUBMISSION = "unknown_submission"
    COUNTY_MISMATCH = "county_mismatch"
    NOT_AUTHORISED = "not_authorised"
    DATE_IN_FUTURE = "date_in_future"
    INVALID_VALUE = "invalid_value"
    SUBMISSION_ID_CONFLICT = "submission_id_conflict"
    UNAVAILABLE = "unavailable"
    INCONSISTENT_TOTALS = "inconsistent_totals"
    DUPLICATE_PERIOD = "duplicate_period"


# (Chinese, English); the offending field and detail are added per refusal.
ERROR_TEXT: dict[ErrorCode, tuple[str, str]] = {
    ErrorCode.MALFORMED: ("报送内容格式错误", "the submission is malformed"),
    ErrorCode.OVERSIZED: ("报送内容超过大小限制", "the submission exceeds the size limit"),
    ErrorCode.UNKNOWN_PROGRAMME: ("未知的督办事项", "unknown programme"),
    ErrorCode.UNKNOWN_COUNTY: (
        "该县不在本督办事项的责任单位之列",
        "unknown county for this programme",
    ),
    ErrorCode.UNKNOWN_MILESTONE: ("工作台账中没有该建设任务", "unknown milestone"),
    ErrorCode.UNKNOWN_REVIEW_KIND: ("未知的审查类型", "unknown review kind"),
    ErrorCode.UNKNOWN_STEP: ("该建设任务没有此工作步骤", "unknown step for this milestone"),
    ErrorCode.UNKNOWN_SUBMISSION: (
        "找不到要撤回的报送",
        "the submission to retract is not on record",
    ),
    ErrorCode.COUNTY_MISMATCH: (
        "报送内容中的县与报送通道不一致",
        "the county in the submission does not match the subject it was sent on",
    ),
    ErrorCode.NOT_AUTHORISED: ("无权报送此类事项", "not authorised to submit this command"),
    ErrorCode.DATE_IN_FUTURE: ("日期晚于当前日期", "the date lies in the future"),
    ErrorCode.INVALID_VALUE: ("取值无效", "invalid value"),
    ErrorCode.SUBMISSION_ID_CONFLICT: (
        "报送编号已被另一份不同内容的报送使用",
        "this submission id was already used for a different submission",
    ),
    ErrorCode.UNAVAILABLE: ("系统暂时无法受理，请稍后重试", "temporarily unavailable, retry later"),
    ErrorCode.INCONSISTENT_TOTALS: (
        "试运行月报数据前后不一致（如立案数大于上报数）",
        "the trial-operation totals are inconsistent (e.g. more cases registered than reported)",
    ),
    ErrorCode.DUPLICATE_PERIOD: (
        "该月试运行月报已报送；如需更正，请先撤回原报送再重新报送",
        "a trial-operation report for this month is already on record; to correct it, have it retracted first",
    ),
}

RETRYABLE: frozenset[ErrorCode] = frozenset({ErrorCode.UNAVAILABLE})
