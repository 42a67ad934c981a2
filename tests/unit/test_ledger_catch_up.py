"""When the ledger catches up by a rebuild rather than by its live consumer (pure)."""

from __future__ import annotations

import pytest

from services.ledger.consumer import FILL_BY_REBUILD_FROM, rebuild_to_catch_up


@pytest.mark.parametrize(
    ("checkpoint", "end", "by_rebuild"),
    [
        (0, FILL_BY_REBUILD_FROM - 1, False),  # a short stream: the live consumer is quick enough
        (0, FILL_BY_REBUILD_FROM, True),  # an empty read model
        (0, 1_000_000, True),
        (499_999, 1_000_000, True),  # more than half of the stream behind
        (500_000, 1_000_000, False),  # half: the live consumer, without holding the tables
        (990_000, 1_000_000, False),  # a short lag
        (15_000, 30_000, False),
        (14_999, 30_000, True),
        (1_000_000, 1_000_000, False),  # caught up
        (5_000, 14_999, False),  # more than half behind, but fewer events than a rebuild is worth
    ],
)
def test_a_rebuild_catches_up_a_read_model_empty_or_behind_by_more_than_half(
    checkpoint: int, end: int, by_rebuild: bool
) -> None:
    assert rebuild_to_catch_up(checkpoint, end) is by_rebuild
