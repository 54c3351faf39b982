"""What a retention change would delete: the count ``!policy retention set`` confirms."""

from __future__ import annotations

from bridge.pipeline.live_policy import LivePolicy
from bridge.pipeline.sweeper import RetentionSweeper


async def count_expiring(
    policy: LivePolicy, sweeper: RetentionSweeper, scope: str, ms: int
) -> tuple[int, int]:
    """(messages, rooms) a retention of ``ms`` at ``scope`` would delete that the policy in
    force would not yet. (0, 0) when the candidate is invalid: the command refuses it."""
    doc = policy.doc("retention")
    doc.setdefault(scope, {})["max_lifetime"] = f"{ms}ms"
    try:
        candidate = policy.preview(doc, "retention")
    except ValueError:
        return 0, 0
    return await sweeper.count_expiring(scope, candidate, policy.engine)
