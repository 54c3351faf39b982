"""Replies: plain text kept, HTML escaped."""

from __future__ import annotations

from bridge.commands.replies import Reply


def test_reply_plain_escapes_and_keeps_line_breaks() -> None:
    reply = Reply.plain('a <script>alert("x")</script>\nsecond & line')
    assert reply.text == 'a <script>alert("x")</script>\nsecond & line'
    assert reply.html == (
        "a &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;<br>second &amp; line"
    )


def test_reply_lines_escapes_title_and_items() -> None:
    reply = Reply.lines("Rooms <3", ["!a:x <b>", "ok & fine"])
    assert reply.text == "Rooms <3\n• !a:x <b>\n• ok & fine"
    assert reply.html == "<p>Rooms &lt;3</p><ul><li>!a:x &lt;b&gt;</li><li>ok &amp; fine</li></ul>"
    assert Reply.lines("Nothing <here>", []).html == "<p>Nothing &lt;here&gt;</p>"
