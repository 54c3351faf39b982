"""Cost of rebuilding the policy engine when the room→space map changes (100k keywords).

The live policy rebuilds its engine on every ``m.space.child``/``m.space.parent`` change. With
the engine cache only policies that changed are compiled again; this measures a space-map
change (a room joins a space that has its own DLP rules) against a cold compile of the same
rules, with 100,000 global keywords and every detector, and 1,000 rooms in 10 spaces.

    python bench/dlp_rebuild.py
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.config import build_config
from bridge.pipeline.live_policy import LivePolicy
from bridge.policy.dlp import DETECTORS

SYLLABLES = "ka lo mi ra ze tu vo ni sha pe qui dro fle gar bin tor mex lus wen yaz".split()


def main() -> None:
    rnd = random.Random(3)
    words: set[str] = set()
    while len(words) < 100_000:
        words.add("".join(rnd.choice(SYLLABLES) for _ in range(5)))
    spaces = [f"!space{i}:corp.example" for i in range(10)]
    config = build_config(
        {
            "homeserver": {"domain": "corp.example"},
            "appservice": {
                "as_token": "a-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                "hs_token": "h-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            },
            "gate": {"token": "g-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},
            "dlp": {
                "keywords": [{"name": "big", "keywords": sorted(words)}],
                "detectors": dict.fromkeys(DETECTORS, "block"),
                "spaces": {
                    s: {"keywords": [{"name": f"k{s}", "keywords": [s[1:7]]}]} for s in spaces
                },
            },
        },
        env={},
    )
    start = time.perf_counter()
    live = LivePolicy(config)
    cold = time.perf_counter() - start
    room_spaces = {f"!room{i}:corp.example": (spaces[i % 10],) for i in range(1_000)}
    start = time.perf_counter()
    live.set_room_spaces(room_spaces)
    first = time.perf_counter() - start
    room_spaces["!new:corp.example"] = (spaces[0],)
    compiled = live.dlp_cache.compiled
    start = time.perf_counter()
    live.set_room_spaces(room_spaces)
    change = time.perf_counter() - start
    assert live.dlp_cache.compiled == compiled
    print("100,000 keywords + all detectors; 1,000 rooms in 10 spaces with their own rules")
    print(f"  cold start: global + 10 space engines compiled     {cold:8.3f} s")
    print(f"  first space map: 1,000 rooms, engines shared      {first:8.3f} s")
    print(f"  one room joins a space: nothing compiled          {change * 1000:8.1f} ms")
    print(f"  ratio change / cold                                {change / cold:8.3f}")


if __name__ == "__main__":
    main()
