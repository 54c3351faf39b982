"""Data-loss prevention: keyword lists, admin regexes and validated built-in detectors.

Modules: :mod:`~bridge.policy.dlp.rules` (the rule models and :class:`DlpPolicy`),
:mod:`~bridge.policy.dlp.regex` (RE2 compilation and its caps),
:mod:`~bridge.policy.dlp.detectors` (cards, IBANs, SSNs, keys and tokens),
:mod:`~bridge.policy.dlp.words` (word boundaries) and :mod:`~bridge.policy.dlp.engine`
(:class:`DlpEngine`: compile once, judge many). The public names are re-exported here.
"""

from __future__ import annotations

from bridge.policy.dlp.detectors import DETECTORS, luhn_valid
from bridge.policy.dlp.engine import CATEGORY, DlpEngine, Request
from bridge.policy.dlp.regex import (
    MAX_REGEX_PROGRAM_SIZE,
    MAX_REGEX_RULES,
    MAX_REGEX_TOTAL_PROGRAM_SIZE,
    InvalidPattern,
    compile_regex,
)
from bridge.policy.dlp.rules import AllowedPhrase, DetectorRule, DlpPolicy, KeywordList, RegexRule

__all__ = [
    "CATEGORY",
    "DETECTORS",
    "MAX_REGEX_PROGRAM_SIZE",
    "MAX_REGEX_RULES",
    "MAX_REGEX_TOTAL_PROGRAM_SIZE",
    "AllowedPhrase",
    "DetectorRule",
    "DlpEngine",
    "DlpPolicy",
    "InvalidPattern",
    "KeywordList",
    "RegexRule",
    "Request",
    "compile_regex",
    "luhn_valid",
]
