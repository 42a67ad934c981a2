"""Identifiers shared by every service, and the one place names are normalised.

A county is its GB/T 2260 division code, a milestone its ledger number ("1.2"), a programme a
short slug that is safe as a NATS subject token. People are ids, never names: 刘兵 (清丰县) and
刘冰 (南乐县) share a romanisation and are two people.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from typing import Annotated

import msgspec

# Every pattern ends with ``$(?!\n)``: Python's ``$`` (msgspec's pattern check is ``re.search``)
# also matches before a final newline, JSON Schema's (ECMA-262) does not; the look-ahead makes
# both mean "the end of the value", so "410928\n" is refused as the published schema says.
COUNTY_CODE_PATTERN = r"^[1-9][0-9]{5}$(?!\n)"
MILESTONE_ID_PATTERN = r"^[0-9]{1,2}\.[0-9]{1,2}$(?!\n)"
PROGRAMME_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$(?!\n)"
# Submission ids come from county systems; they become Nats-Msg-Id and event-id prefixes.
SUBMISSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$(?!\n)"
PERSON_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$(?!\n)"

CountyCode = Annotated[str, msgspec.Meta(pattern=COUNTY_CODE_PATTERN, description="GB/T 2260 code")]
MilestoneId = Annotated[str, msgspec.Meta(pattern=MILESTONE_ID_PATTERN, description="e.g. 1.2")]
ProgrammeId = Annotated[str, msgspec.Meta(pattern=PROGRAMME_ID_PATTERN)]
SubmissionId = Annotated[str, msgspec.Meta(pattern=SUBMISSION_ID_PATTERN)]
PersonId = Annotated[str, msgspec.Meta(pattern=PERSON_ID_PATTERN)]
# Instants on the wire must carry their offset: a naive time is ambiguous across zones.
Instant = Annotated[dt.datetime, msgspec.Meta(tz=True)]

_INNER_SPACE = re.compile(r"\s+")


def normalise_name(raw: str) -> str:
    """NFKC-normalise a name and drop whitespace padding.

    The notice pads two-character names to table width ("刘  兵", "范  县"); NFKC also folds
    full-width spaces and letters. Chinese names carry no meaningful inner spaces, so all runs
    of whitespace go; a Latin name keeps single spaces between words.
    """
    text = unicodedata.normalize("NFKC", raw).strip()
    if not text:
        return text
    parts = _INNER_SPACE.split(text)
    if all(_is_cjk_word(p) for p in parts):
        return "".join(parts)
    return " ".join(parts)


def _is_cjk_word(word: str) -> bool:
    return all("\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" for ch in word)
