"""Pull every human-readable text out of a client-format Matrix event (pure, never raises).

What is scanned, by event type:

* any event type (custom types too -- data leaks whether or not a client renders it):
  ``content.body``, ``content.formatted_body`` (HTML reduced to text), ``content.filename``,
  ``content.reason`` (redactions, kicks, bans, leaves, knocks: clients show it), the
  extensible-event text forms ``m.text`` / ``org.matrix.msc1767.text``, media captions
  ``m.caption`` / ``org.matrix.msc1767.caption`` (in either text form), location
  descriptions (``m.location`` / ``org.matrix.msc3488.location`` ``description``, and
  live-location ``m.beacon_info`` / ``org.matrix.msc3672.beacon_info`` ``description``), and
  the same fields of an edit's ``content["m.new_content"]``;
* polls (``m.poll.start``, ``org.matrix.msc3381.poll.start``, ``m.poll``): question and answer
  texts in both the ``m.text`` list and the plain ``body``/``msc1767.text`` forms;
* ``m.room.name`` ``name``; ``m.room.topic`` ``topic`` and ``m.topic``;
  ``m.room.member`` ``displayname``; ``m.reaction`` ``m.relates_to.key``; the names
  (localparts) of ``m.room.canonical_alias`` ``alias`` and ``alt_aliases``.

Then, so that text cannot hide where no client looks (custom keys, nested objects, custom
event types), **every other string value** of the content, walked depth-first in key order
up to :data:`MAX_DEPTH` levels and :data:`MAX_NODES` values, except the values of
protocol keys that hold identifiers, not prose (:data:`STRUCTURAL_KEYS`: ``msgtype``,
``mimetype``, ``url``, ``event_id`` ...); a media URL key (``url``, ``avatar_url``,
``thumbnail_url``) is skipped only when its value is an ``mxc://`` URI. The walk also reads
the content's **keys** (other than the protocol's, :data:`_PROTOCOL_KEYS`, and the
structural keys) and **integers of 14 to 19 digits** (a card written as a JSON number;
shorter numbers are sizes, durations and millisecond timestamps). Last, the
``state_key`` of state events of custom types (not ``m.*``, whose state keys are user or
room IDs or empty) unless it is the sender's own user ID (per-user state).

The fields are read in that order (message fields first, then the walk, then the state key)
and share one budget of :data:`MAX_SCAN_CHARS` characters, so what a sender sees most is
always read. Not scanned: ``m.room.encrypted`` (ciphertext) and the structural keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from bridge.policy.normalize import html_to_text

__all__ = ["MAX_DEPTH", "MAX_NODES", "MAX_SCAN_CHARS", "STRUCTURAL_KEYS", "extract_texts"]

#: Characters read from one event. The gate refuses events over 64 KiB, so every text of a
#: legal event fits, with room for the text of ``formatted_body`` read a second time.
MAX_SCAN_CHARS = 256 * 1024
#: Nesting levels and values that the walk over the rest of the content visits.
MAX_DEPTH = 16
MAX_NODES = 20_000
#: Content keys whose values are identifiers or protocol words, not text anyone reads.
STRUCTURAL_KEYS = frozenset(
    {
        "alg", "algorithm", "alias", "alt_aliases", "avatar_url", "ciphertext", "creator",
        "device_id", "event_id", "ext", "format", "geo_uri", "guest_access", "hashes",
        "history_visibility", "iv", "join_rule", "k", "key_ops", "kty", "membership",
        "mimetype", "msgtype", "pinned", "redacts", "rel_type", "room_id", "room_version",
        "sender", "sender_key", "session_id", "thumbnail_url", "uri", "url", "user_id", "v",
        "via",
    }
)  # fmt: skip
_POLL_KEYS = ("m.poll.start", "org.matrix.msc3381.poll.start", "m.poll")
_TEXT_KEYS = ("m.text", "org.matrix.msc1767.text")
_CAPTION_KEYS = ("m.caption", "org.matrix.msc1767.caption")
_LOCATION_KEYS = ("m.location", "org.matrix.msc3488.location")
_EXTRA_KEYS = frozenset({"reason", *_CAPTION_KEYS, *_LOCATION_KEYS})
_BEACON_TYPES = frozenset({"m.beacon_info", "org.matrix.msc3672.beacon_info"})
_HTML_MIMETYPES = frozenset({"text/html", "org.matrix.custom.html"})
#: Structural keys that hold a media URI: skipped only when the value is one (``mxc://``),
#: else read like any string (text hidden where a client expects a media URI).
_MEDIA_URL_KEYS = frozenset({"avatar_url", "thumbnail_url", "url"})
_MAX_LIST = 256  # answers, m.text representations: more than any real client sends
_USER_ID = re.compile(r"@[^\s:]+:[^\s]+")  # state keys of per-user state (beacons ...)
#: Keys of the Matrix protocol: not read as text themselves (their values are). Any other key
#: of the content is text too: ``{"4111 1111 1111 1111": true}`` carries a card in its key.
_PROTOCOL_KEYS = frozenset(
    {
        "answers", "body", "blurhash", "chunk", "displayname", "duration", "file", "filename",
        "formatted_body", "h", "info", "is_falling_back", "key", "kind", "m.caption", "m.file",
        "m.in_reply_to", "m.location", "m.mentions", "m.new_content", "m.relates_to", "m.text",
        "m.topic", "max_selections", "name", "org.matrix.msc1767.caption",
        "org.matrix.msc1767.text", "org.matrix.msc3488.location", "question", "reason", "room",
        "size", "thumbnail_file", "thumbnail_info", "topic", "user_ids", "w", "description",
        "m.poll", "m.poll.start", "org.matrix.msc3381.poll.start", "m.beacon_info", "live",
        "timeout", "m.asset", "org.matrix.msc3488.asset", "m.ts", "org.matrix.msc3488.ts",
        "type", "m.emote", "m.notice", "m.message", "m.markup", "mimetype",
    }
)  # fmt: skip
#: Integers of 14 to 19 digits are read as text (a card number written as a JSON number);
#: shorter ones are sizes, durations and millisecond timestamps (13 digits until 2286).
_NUMBER_AS_TEXT = (10**13, 10**19)


class _Collector:
    """Accumulates distinct texts up to a character budget."""

    __slots__ = ("budget", "nodes", "read", "seen", "texts")

    def __init__(self, budget: int) -> None:
        self.texts: list[str] = []
        self.seen: set[str] = set()
        self.read: set[int] = set()  # ids of the event's strings already read (no HTML twice)
        self.budget = budget
        self.nodes = MAX_NODES

    def add(self, value: object, *, html: bool = False) -> None:
        if not isinstance(value, str) or not value or self.budget <= 0:
            return
        if id(value) in self.read:
            return
        self.read.add(id(value))
        if html:
            value = html_to_text(value[: self.budget * 4])  # markup shrinks; bound the parse
            if not value:
                return
        if value in self.seen:
            return
        if len(value) > self.budget:
            value = value[: self.budget]
        self.seen.add(value)
        self.texts.append(value)
        self.budget -= len(value)


def _add_text_forms(out: _Collector, obj: Mapping[str, Any]) -> None:
    """``m.text`` lists (``[{"body", "mimetype"}]``) and ``msc1767.text`` strings."""
    for key in _TEXT_KEYS:
        value = obj.get(key)
        if isinstance(value, str):
            out.add(value)
        elif isinstance(value, list):
            for rep in value[:_MAX_LIST]:
                if isinstance(rep, Mapping):
                    out.add(rep.get("body"), html=rep.get("mimetype") in _HTML_MIMETYPES)
                elif isinstance(rep, str):
                    out.add(rep)


def _add_extra_fields(out: _Collector, content: Mapping[str, Any]) -> None:
    out.add(content.get("reason"))
    for key in _CAPTION_KEYS:
        caption = content.get(key)
        if isinstance(caption, Mapping):  # {"m.text": [...]}
            _add_text_forms(out, caption)
        elif isinstance(caption, list | str):  # the bare list (or string) shape
            _add_text_forms(out, {"m.text": caption})
    for key in _LOCATION_KEYS:
        location = content.get(key)
        if isinstance(location, Mapping):
            out.add(location.get("description"))


def _add_message_fields(out: _Collector, content: Mapping[str, Any]) -> None:
    out.add(content.get("body"))
    out.add(content.get("formatted_body"), html=True)
    out.add(content.get("filename"))
    _add_text_forms(out, content)
    if not _EXTRA_KEYS.isdisjoint(content):  # rare: one cheap test for the common case
        _add_extra_fields(out, content)


def _add_poll(out: _Collector, poll: object) -> None:
    if not isinstance(poll, Mapping):
        return
    question = poll.get("question")
    if isinstance(question, Mapping):
        out.add(question.get("body"))
        _add_text_forms(out, question)
    elif isinstance(question, str):
        out.add(question)
    answers = poll.get("answers")
    if isinstance(answers, list):
        for answer in answers[:_MAX_LIST]:
            if isinstance(answer, Mapping):
                out.add(answer.get("body"))
                _add_text_forms(out, answer)
            elif isinstance(answer, str):
                out.add(answer)


def _add_content(out: _Collector, etype: str, content: Mapping[str, Any]) -> None:
    _add_message_fields(out, content)
    for key in _POLL_KEYS:
        _add_poll(out, content.get(key))
    if etype == "m.room.name":
        out.add(content.get("name"))
    elif etype == "m.room.topic":
        out.add(content.get("topic"))
        topic = content.get("m.topic")
        if isinstance(topic, Mapping):
            _add_text_forms(out, topic)
        elif isinstance(topic, list):  # tolerate the bare-list shape
            _add_text_forms(out, {"m.text": topic})
    elif etype == "m.room.member":
        out.add(content.get("displayname"))
    elif etype == "m.room.canonical_alias":
        _add_alias_names(out, content)
    elif etype in _BEACON_TYPES:
        out.add(content.get("description"))
    elif etype == "m.reaction":
        relates = content.get("m.relates_to")
        if isinstance(relates, Mapping):
            out.add(relates.get("key"))


def _add_alias_names(out: _Collector, content: Mapping[str, Any]) -> None:
    """The names (localparts) of ``alias`` and ``alt_aliases``: an alias is chosen by a user
    and shown to everyone in the room and the directory (``#kingfisher-launch:corp.example``).
    The server part is the room's server, not text anyone typed."""
    alt = content.get("alt_aliases")
    aliases = [content.get("alias"), *(alt[:_MAX_LIST] if isinstance(alt, list) else ())]
    for alias in aliases:
        if isinstance(alias, str) and alias.startswith("#"):
            out.add(alias[1:].partition(":")[0])


def _hides_text(key: str, value: object) -> bool:
    """Whether a structural key's value is not what the protocol puts there (a media URL
    key whose value is no ``mxc://`` URI), so it is read as text."""
    return key in _MEDIA_URL_KEYS and isinstance(value, str) and not value.startswith("mxc://")


def _walk(out: _Collector, value: object, depth: int) -> None:
    """Every string below ``value`` (depth-first, key order), bounded in depth and count."""
    out.nodes -= 1
    if out.nodes < 0 or out.budget <= 0:
        return
    if isinstance(value, str):
        out.add(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        if _NUMBER_AS_TEXT[0] <= abs(value) < _NUMBER_AS_TEXT[1]:
            out.add(str(value))
    elif depth >= MAX_DEPTH:
        return
    elif isinstance(value, Mapping):
        html = value.get("mimetype") in _HTML_MIMETYPES
        for key, item in value.items():
            if key in STRUCTURAL_KEYS and not _hides_text(key, item):
                continue
            if isinstance(key, str) and key not in _PROTOCOL_KEYS and key not in STRUCTURAL_KEYS:
                out.add(key)
            if isinstance(item, str) and (key == "formatted_body" or (html and key == "body")):
                out.add(item, html=True)
            else:
                _walk(out, item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _walk(out, item, depth + 1)


def extract_texts(event: Mapping[str, Any], *, max_chars: int = MAX_SCAN_CHARS) -> list[str]:
    """Every human-readable text of ``event`` that DLP must scan, in a stable order.

    Exact duplicates (a ``formatted_body`` equal to its ``body``) are returned once. The
    sum of the lengths is at most ``max_chars``. Encrypted events yield nothing; content of
    any unexpected shape is skipped, never raised on.
    """
    out = _Collector(max_chars)
    try:
        if not isinstance(event, Mapping):
            return []
        etype = event.get("type")
        etype = etype if isinstance(etype, str) else ""
        if etype == "m.room.encrypted":
            return []
        content = event.get("content")
        if not isinstance(content, Mapping):
            return []
        _add_content(out, etype, content)
        new_content = content.get("m.new_content")
        if isinstance(new_content, Mapping):
            _add_content(out, etype, new_content)
        _walk(out, content, 0)
        state_key = event.get("state_key")
        if (
            isinstance(state_key, str)
            and not etype.startswith("m.")
            and (state_key != event.get("sender") or _USER_ID.fullmatch(state_key) is None)
        ):
            # Per-user state is keyed by its sender's ID; any other user-ID-shaped key is
            # text like the rest (``@4111-1111-1111-1111:x`` is a valid user ID).
            out.add(state_key)
        return out.texts
    except Exception:  # a hostile Mapping implementation must not break the gate
        return out.texts
