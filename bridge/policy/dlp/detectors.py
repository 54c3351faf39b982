"""Built-in detectors: a cheap RE2 prefilter each, then a validator (Luhn, mod-97, ...).

Every detector reads the *clean* text (see :mod:`bridge.policy.normalize`) as UTF-8 bytes and
returns a masked excerpt of its first real hit, never the matched value itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter

from bridge.policy.dlp.regex import compiled

__all__ = ["DETECTORS", "Detector", "luhn_valid", "mask_text"]


def _stars(n: int) -> str:
    return " ".join("*" * min(4, n - i) for i in range(0, n, 4))


def mask_text(text: str) -> str:
    """Keep the first and last character of longer matches, star the rest."""
    if len(text) <= 4:
        return "*" * len(text)
    return text[0] + "*" * (len(text) - 2) + text[-1]


def _mask_token(token: str, prefix: str) -> str:
    return f"{prefix}{'*' * 8}" if token.startswith(prefix) else "*" * 8


# Each digit replaced by the digit sum of its double (Luhn's every-second-digit step).
_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")
_VALUES = bytes.maketrans(b"0123456789", bytes(range(10)))
_DOUBLED_VALUES = bytes.maketrans(b"0123456789", bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))


def _luhn(digits: bytes) -> bool:
    rev = digits[::-1]
    return (sum(rev[0::2]) + sum(rev[1::2].translate(_DOUBLED)) - 48 * len(digits)) % 10 == 0


def luhn_valid(digits: str) -> bool:
    """Luhn checksum of an ASCII digit string."""
    return _luhn(digits.encode("ascii"))


# Card numbers are written with any common separator between groups: a space, a dash, a dot
# or a slash, alone or with spaces around it (``4111 - 1111``), up to three in a row.
_CARD_SEPARATOR = r"(?: ?[-./]{1,3} ?| )"
_CARD_RUN = rf"[0-9]+(?:{_CARD_SEPARATOR}[0-9]+)*"
_SEPARATORS = re.compile(rb"([^0-9]+)")


# Separator kinds: spaces and dashes are one kind (``4111 1111-1111 1111`` is a card, as it
# always was); a dot or a slash must separate every group of a card (``4111.1111.1111.1111``)
# so that phone numbers such as ``0171/4780-890`` next to others do not form one.
_SEPARATOR_KIND = bytes.maketrans(b" -./", b"  ./")


def _card_groups(data: bytes) -> Iterable[tuple[list[bytes], list[bytes]]]:
    """Each run of digit groups: its groups and the separators between them."""
    for m in _CARD_RUN_RE.finditer(data):
        run = m.group()
        if b"-" in run or b"." in run or b"/" in run:
            parts = _SEPARATORS.split(run)
            yield parts[0::2], parts[1::2]
        else:  # single spaces only (a run never holds two in a row): a faster split in C
            groups = run.split(b" ")
            yield groups, [b" "] * (len(groups) - 1)


def _one_kind(separators: list[bytes]) -> bool:
    """Whether ``separators`` are all of one kind (spaces and dashes count as one)."""
    kinds = {sep.translate(_SEPARATOR_KIND).strip() or b" " for sep in separators}
    return len(kinds) <= 1


def _card_excerpt(digits: bytes, tried: set[bytes]) -> str | None:
    n = len(digits)
    if n < 13 or n > 19 or digits in tried:
        return None
    tried.add(digits)  # a run repeating one number is checked once
    if _luhn(digits) and digits.count(digits[:1]) != n:
        text = digits.decode("ascii")
        return f"{text[:4]} {_stars(n - 8)} {text[-4:]}"
    return None


def _find_card(data: bytes) -> str | None:
    """A Luhn-valid card number anywhere in a run of digit groups.

    A run is digits with a separator between groups: a space, dash, dot or slash, alone or
    spaced (``qty 2 4111-1111-1111-1111``, ``4111.1111.1111.1111``, ``4111 / 1111 / ...``,
    ``4111 1111 1111 1111 12/26``, ``5500 0000 0000 0004 123``). A card is

    * the whole run, if it has 13-19 digits in at most 5 groups (``4111 1111 1111 1111``,
      ``411 11111 1111 1111``) or in groups of one size but the last (``4 1 1 1 ...``,
      ``41 11 11 ...``, written to get around the detector) -- while a list of small
      numbers (``12 7 33 5 18 ...``) is not a card;
    * one whole group of 13-19 digits (written without separators) inside the run;
    * consecutive whole groups inside the run, written the way cards are: a first group of
      4 digits, middle groups of 4 or 6, a last group of 3-6 (``4-4-4-4``, ``4-6-5`` Amex,
      ``4-6-4`` Diners, ``4-4-4-4-3``), so phone numbers and dates side by side do not form
      a "card" out of pieces of several numbers.

    A card never starts or ends inside a group: the 20-digit order number
    ``41111111111111111111`` is not searched for 16-digit windows. The price of finding a
    card followed by more digits: a 17-19 digit number grouped by 4 whose first 16 digits
    pass Luhn is reported too (it reads like a card and a CVC).
    """
    tried: set[bytes] = set()
    for groups, separators in _card_groups(data):
        sizes = list(map(len, groups))
        total = sum(sizes)
        if total < 13:
            continue
        count = len(groups)
        if total <= 19 and (count <= 5 or len(set(sizes[:-1])) == 1) and _one_kind(separators):
            excerpt = _card_excerpt(b"".join(groups), tried)
            if excerpt is not None:
                return excerpt
        if count == 1:
            continue
        try:
            shape = bytes(sizes)  # one byte per group, its length, for the shape patterns
        except ValueError:  # a group of 256 digits or more
            shape = bytes(size if size < 255 else 255 for size in sizes)
        for m in _LONE_CARD_GROUP.finditer(shape):
            excerpt = _card_excerpt(groups[m.start()], tried)
            if excerpt is not None:
                return excerpt
        # Literals of the card shapes present in this run, by number of groups; most are
        # absent (a quick test in C each).
        present: dict[int, set[bytes]] = {}
        for literal in _CARD_SHAPE_LITERALS:
            if literal in shape:
                present.setdefault(len(literal), set()).add(literal)
        if not present:
            continue
        # (start, -length) of every card-shaped window whose Luhn sum passes and whose
        # separators are of one kind: the first start wins and, there, the longest (a
        # 19-digit card written 4-4-4-4-3 reads like a 16-digit card and a CVC; both are
        # tried). Which windows pass is worked out for all windows of n groups at once, in C
        # (see _WindowMasks); only those are looked at one by one.
        digits = b"".join(groups)
        offsets = list(accumulate(sizes, initial=0))
        masks = _WindowMasks(digits, offsets, separators)
        passing: list[tuple[int, int, int]] = []
        for n, literals in present.items():
            failed = masks.failed(n)
            i = failed.find(0)
            while i >= 0:
                if shape[i : i + n] in literals:
                    start, end = offsets[i], offsets[i + n]
                    passing.append((start, start - end, end))
                i = failed.find(0, i + 1)
        for start, _, end in sorted(passing):
            excerpt = _card_excerpt(digits[start:end], tried)
            if excerpt is not None:
                return excerpt
    return None


def _card_shapes() -> tuple[bytes, ...]:
    """Group lengths that consecutive groups of a card have, one byte per group.

    A first group of 4 digits, middle groups of 4 or 6, a last group of 3-6, 13-19 digits.
    """
    shapes: list[tuple[int, ...]] = []
    todo: list[tuple[int, ...]] = [(4,)]
    while todo:
        head = todo.pop()
        for last in range(3, 7):
            if 13 <= sum(head) + last <= 19:
                shapes.append((*head, last))
        for middle in (4, 6):
            if sum(head) + middle + 3 <= 19:
                todo.append((*head, middle))
    return tuple(bytes(shape) for shape in sorted(set(shapes)))


_CARD_SHAPE_LITERALS = _card_shapes()
# A group of 13-19 digits on its own, written without separators.
_LONE_CARD_GROUP = re.compile(b"[\x0d-\x13]")


def _luhn_values(digits: bytes) -> tuple[bytearray, bytearray]:
    """Each digit's value in the Luhn sum of windows ending on an even / an odd position.

    Which digits Luhn doubles depends only on the parity of their distance to the window's
    end, so the prefix sums of these two (one per parity of the end) answer every window:
    a window passes when the sums at its two ends are equal mod 10.
    """
    plain = digits.translate(_VALUES)
    doubled = digits.translate(_DOUBLED_VALUES)
    even_plain = bytearray(plain)  # windows ending on an even position
    even_plain[1::2] = doubled[1::2]
    odd_plain = bytearray(doubled)  # windows ending on an odd position
    odd_plain[1::2] = plain[1::2]
    return even_plain, odd_plain


# Byte-wise operations on equal-length byte strings, each one pass in C (through big ints).
def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _or(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") | int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _and(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") & int.from_bytes(b, "big")).to_bytes(len(a), "big")


# Any non-zero byte to 1: "these two bytes differ" from an XOR.
_NONZERO = bytes([0] + [1] * 255)
_MOD10 = (10).__rmod__  # x -> x % 10
_MOD2 = (2).__rmod__


def _separator_kind(separator: bytes) -> bytes:
    """The kind of one separator (spaces and dashes are one kind)."""
    return separator.translate(_SEPARATOR_KIND).strip() or b" "


def _separator_kinds() -> dict[bytes, int]:
    """Every separator a card run can hold (``_CARD_SEPARATOR``) -> a number per kind."""
    separators = [b" "]
    middles = [b""]
    for _ in range(3):  # 1 to 3 dashes, dots or slashes, with or without a space around
        middles = [m + c for m in middles for c in (b"-", b".", b"/")]
        separators += [a + m + b for m in middles for a in (b"", b" ") for b in (b"", b" ")]
    ids: dict[bytes, int] = {}
    return {sep: ids.setdefault(_separator_kind(sep), len(ids)) for sep in separators}


_KIND_IDS = _separator_kinds()

# Prefix sums of digit values in byte lanes: a block of 16 values (16 x 9 = 144) fits a byte.
_BLOCK = 16
_MOD10_TABLE = bytes(i % 10 for i in range(256))
# Per doubling step of the prefix sum: the lanes that add the lane ``step`` places before
# (those of the same block).
_STEP_MASKS = tuple(
    (step, bytes(0 if lane < step else 255 for lane in range(_BLOCK))) for step in (1, 2, 4, 8)
)


def _prefix_mod10(values: bytes | bytearray) -> bytes:
    """``q[k] = sum(values[:k]) % 10`` for k in 0 .. len(values); every value at most 9.

    One byte per position, computed in C: prefix sums inside blocks of :data:`_BLOCK` lanes
    by doubling steps on one big integer, then the total before each block added to its
    lanes. A Python step per digit (``itertools.accumulate``) cost milliseconds per 64 KiB.
    """
    n = len(values)
    size = n + (-n % _BLOCK)
    blocks = size // _BLOCK
    lanes = int.from_bytes(bytes(values) + bytes(size - n), "little")
    for step, mask in _STEP_MASKS:
        lanes += (lanes << (8 * step)) & int.from_bytes(mask * blocks, "little")
    inner = lanes.to_bytes(size, "little")  # sums from the block's start, at most 144
    before = bytes(map(_MOD10, accumulate(inner[_BLOCK - 1 :: _BLOCK], initial=0)))
    spread = bytearray(size)
    for lane in range(_BLOCK):
        spread[lane::_BLOCK] = before[:blocks]
    total = int.from_bytes(inner, "little") + int.from_bytes(spread, "little")  # <= 153
    return b"\x00" + total.to_bytes(size, "little")[:n].translate(_MOD10_TABLE)


class _WindowMasks:
    """Which windows of ``n`` whole groups fail Luhn or mix separator kinds, for every ``n``.

    :meth:`failed` answers with one byte per first group (0: the window passes both), built
    with a few byte-wise operations in C instead of a Python step per window: a crafted
    64 KiB run of digit groups has tens of thousands of windows, and an event holding a
    right-to-left override is read twice.
    """

    __slots__ = ("_diff", "_even", "_odd", "_parity")

    def __init__(self, digits: bytes, offsets: list[int], separators: list[bytes]) -> None:
        # Per group boundary: both Luhn prefix sums mod 10 and the parity of its offset. A
        # window from boundary i to boundary e passes Luhn when the sums of the parity of
        # its end are equal mod 10 at both boundaries (see _luhn_values); the prefix sums
        # are taken in C (_prefix_mod10) and picked at the boundaries.
        even_plain, odd_plain = _luhn_values(digits)
        at_boundaries = itemgetter(*offsets)  # offsets has two boundaries at least
        self._even = bytes(at_boundaries(_prefix_mod10(even_plain)))
        self._odd = bytes(at_boundaries(_prefix_mod10(odd_plain)))
        self._parity = bytes(map(_MOD2, offsets))
        # 1 where separator j and separator j + 1 are of different kinds.
        if separators.count(separators[0]) == len(separators):  # one separator throughout
            self._diff = bytes(len(separators) - 1)
        else:
            kinds = _kind_ids(separators)
            self._diff = _xor(kinds[:-1], kinds[1:]).translate(_NONZERO)

    def failed(self, n: int) -> bytes:
        """Per first group i (windows of ``n`` groups, n >= 2): 0 if the window passes."""
        length = len(self._odd) - n  # windows of n groups
        if length <= 0:
            return b""
        odd, even, parity = self._odd, self._even, self._parity
        odd_differs = _xor(odd[n:], odd[:length]).translate(_NONZERO)
        even_differs = _xor(even[n:], even[:length]).translate(_NONZERO)
        end_odd = parity[n:]
        end_even = _xor(end_odd, b"\x01" * length)
        # An even end reads the odd sums, an odd end the even sums (see _find_card).
        failed = _or(_and(odd_differs, end_even), _and(even_differs, end_odd))
        for k in range(n - 2):  # separators i .. i + n - 2 all of one kind
            failed = _or(failed, self._diff[k : k + length])
        return failed


def _kind_ids(separators: list[bytes]) -> bytes:
    """One byte per separator: equal bytes for separators of one kind."""
    try:
        return bytes(map(_KIND_IDS.__getitem__, separators))
    except KeyError:  # not a card separator (never the case for _CARD_RUN's groups)
        ids: dict[bytes, int] = {}
        return bytes(ids.setdefault(_separator_kind(sep), len(ids)) for sep in separators)


def _find_ssn(data: bytes) -> str | None:
    """Three whole groups of 3, 2 and 4 digits (space or dash between) in the valid ranges."""
    for m in _SSN_RE.finditer(data):
        area, group, serial = m.groups()
        if area in (b"000", b"666") or area[:1] == b"9":
            continue
        if group == b"00" or serial == b"0000":
            continue
        return f"***-**-{serial.decode('ascii')}"
    return None


# Whole groups: no digit just before or after (two candidates can never overlap).
_SSN_RE = re.compile(rb"(?<![0-9])([0-9]{3})[ -]([0-9]{2})[ -]([0-9]{4})(?![0-9])")


_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip
_IBAN_RUN = r"\b[A-Za-z]{2}[0-9]{2}(?: ?[A-Za-z0-9])+"
_IBAN_PREFILTER = r"\b[A-Za-z]{2}[0-9]{2}(?: ?[A-Za-z0-9]){11}"


# Letters to their mod-97 values ("A" -> "10" ... "Z" -> "35"); digits stay.
_IBAN_DIGITS = {ord(c): str(10 + i) for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")}


def _iban_valid(iban: str) -> bool:
    return int((iban[4:] + iban[:4]).translate(_IBAN_DIGITS)) % 97 == 1


def _find_iban(data: bytes) -> str | None:
    """A valid IBAN (single spaces allowed inside) starting and ending at a group boundary.

    Each group of a run is a possible start; the end is found from the running total of
    group lengths, so a run of many look-alike groups costs one lookup per group.
    """
    tried: set[str] = set()
    for m in _IBAN_RUN_RE.finditer(data):
        tokens = m.group().decode("ascii").split(" ")
        ends: dict[int, int] = {}
        total = 0
        for k, token in enumerate(tokens):
            ends[total] = k
            total += len(token)
        ends[total] = len(tokens)
        offset = 0
        for i, token in enumerate(tokens):
            start, offset = offset, offset + len(token)
            head = token[:4]
            if len(head) != 4 or not head[:2].isalpha() or not head[2:].isdigit():
                continue
            length = _IBAN_LENGTHS.get(head[:2].upper())
            end = None if length is None else ends.get(start + length)
            if end is None:
                continue
            iban = "".join(tokens[i:end]).upper()
            if iban in tried:
                continue
            tried.add(iban)
            if _iban_valid(iban):
                return f"{iban[:4]} {_stars(len(iban) - 6)} {iban[-2:]}"
    return None


_PK_HEADER = r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"


def _find_private_key(data: bytes) -> str | None:
    for m in _PK_HEADER_RE.finditer(data):
        end = m.end()
        # Key material (a base64 run) follows, or the block is closed by its END line.
        if _B64_RUN_RE.search(data, end, end + 600) is not None or b"-----END " in data[end:]:
            return f"{m.group().decode('ascii')} [key material hidden]"
    return None


def _token_finder(pattern: str, prefixes: tuple[str, ...]) -> Callable[[bytes], str | None]:
    def find(data: bytes) -> str | None:
        m = compiled(pattern).search(data)
        if m is None:
            return None
        token = m.group().decode("ascii")
        prefix = next((p for p in prefixes if token.startswith(p)), "")
        return _mask_token(token, prefix)

    return find


_JWT = r"\beyJ[A-Za-z0-9_-]{4,}={0,2}\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]*"


def _find_jwt(data: bytes) -> str | None:
    tried: set[bytes] = set()
    for m in _JWT_RE.finditer(data):
        header_b64 = m.group().split(b".", 1)[0].rstrip(b"=")
        if header_b64 in tried:
            continue
        tried.add(header_b64)
        try:
            padded = header_b64 + b"=" * (-len(header_b64) % 4)
            raw = base64.urlsafe_b64decode(padded)
            # Cheap tests first: a header is a JSON object naming its algorithm.
            if not raw.rstrip().endswith(b"}") or b'"alg"' not in raw:
                continue
            header = json.loads(raw)
        except (ValueError, binascii.Error):
            continue
        if isinstance(header, dict) and isinstance(header.get("alg"), str):
            alg = header["alg"]
            alg = alg if alg.isalnum() and len(alg) <= 16 else "?"
            return f"eyJ**** (JWT, alg={alg})"
    return None


_CARD_RUN_RE = compiled(_CARD_RUN)
_IBAN_RUN_RE = compiled(_IBAN_RUN)
_PK_HEADER_RE = compiled(_PK_HEADER)
_B64_RUN_RE = compiled(r"[A-Za-z0-9+/=]{40,}")
_JWT_RE = compiled(_JWT)

_AWS = r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"
_GITHUB = r"\b(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,255})\b"
_SLACK = r"\bxox[abprs]-[A-Za-z0-9]+-[A-Za-z0-9-]{8,250}"


@dataclass(frozen=True, slots=True)
class Detector:
    """A built-in detector: prefilter pattern, validator, and how a finding describes it."""

    prefilter: str  # cheap RE2 pattern that every true hit matches
    find: Callable[[bytes], str | None]  # validator: masked excerpt of the first real hit
    what: str  # "it appears to contain ..."
    secret: bool  # a credential: tell the sender to revoke it


DETECTORS: Mapping[str, Detector] = {
    "card": Detector(
        rf"[0-9](?:{_CARD_SEPARATOR}?[0-9]){{12}}", _find_card, "a payment card number", False
    ),
    "iban": Detector(_IBAN_PREFILTER, _find_iban, "a bank account number (IBAN)", False),
    "us_ssn": Detector(
        r"[0-9]{3}[ -][0-9]{2}[ -][0-9]{4}", _find_ssn, "a US social security number", False
    ),
    "private_key": Detector(_PK_HEADER, _find_private_key, "a private key", secret=True),
    "aws_access_key": Detector(
        _AWS, _token_finder(_AWS, ("AKIA", "ASIA")), "an AWS access key", secret=True
    ),
    "github_token": Detector(
        _GITHUB,
        _token_finder(_GITHUB, ("github_pat_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
        "a GitHub token",
        secret=True,
    ),
    "slack_token": Detector(
        _SLACK,
        _token_finder(_SLACK, ("xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-")),
        "a Slack token",
        secret=True,
    ),
    "jwt": Detector(_JWT, _find_jwt, "a JSON Web Token (a login credential)", secret=True),
}
