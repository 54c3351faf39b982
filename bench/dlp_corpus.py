# ruff: noqa: RUF001  (multilingual text and look-alike letters on purpose)
"""Generated corpora for the DLP benchmarks: innocent multilingual chat and worst-case events.

Nothing is downloaded: the sentences below are written for this file and combined with
generated numbers (phone numbers, dates, IP addresses, order numbers, prices) by a seeded
random generator, so every run judges the same texts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

SENTENCES: dict[str, list[str]] = {
    "en": [
        "Can we move the standup to half past ten tomorrow?",
        "The café on the corner does a great crème brûlée.",
        "I pushed the fix, please take another look when you can.",
        "Our naïve approach worked for the résumé parser after all.",
        "Lunch at the new place near the station on Friday?",
    ],
    "fr": [
        "Bonjour à tous, la réunion est décalée à jeudi après-midi.",
        "Pouvez-vous vérifier le déploiement de la version préliminaire ?",
        "Merci pour votre aide, c'était très apprécié !",
        "Le château près de Montréal est fermé pour rénovation.",
    ],
    "de": [
        "Können wir das Gespräch auf nächste Woche verschieben?",
        "Die Straße vor dem Büro ist wegen Bauarbeiten gesperrt.",
        "Schöne Grüße aus Zürich und bis morgen früh.",
        "Das Ergebnis der Überprüfung liegt jetzt vor.",
    ],
    "es": [
        "¿Mañana revisamos el informe del año pasado?",
        "La niña ganó el campeonato de ajedrez en Málaga.",
        "Gracias por la corrección, ya está publicada.",
    ],
    "pt": [
        "A reunião de amanhã começa às nove horas em São Paulo.",
        "Não esqueça de atualizar a configuração do serviço.",
        "Obrigado pela ajuda com a migração.",
    ],
    "pl": [
        "Dzień dobry, czy możemy przełożyć spotkanie na środę?",
        "Łódź i Gdańsk są piękne o tej porze roku.",
        "Proszę o szybką odpowiedź w sprawie wdrożenia.",
    ],
    "cs": [
        "Děkuji za rychlou odpověď, zítra to opravím.",
        "Příští týden budu v Brně na školení.",
    ],
    "tr": [
        "Yarın sabah toplantıya katılabilir misiniz?",
        "İstanbul'daki ofis pazartesi günü açılıyor.",
        "Kız kardeşim ılık su içmeyi seviyor.",
    ],
    "vi": [
        "Chúng ta sẽ họp vào lúc mười giờ sáng mai.",
        "Cảm ơn bạn đã giúp đỡ trong dự án này.",
    ],
    "ru": [
        "Привет, как дела? Встретимся завтра в десять утра.",
        "Сервер перезагрузили, всё работает нормально.",
        "Спасибо за помощь с отчётом по проекту.",
        "Кот спит на окне, а за окном идёт снег.",
        "Сор в комнате, рос в саду, сесс не бывает.",
    ],
    "uk": [
        "Доброго ранку, нарада переноситься на четвер.",
        "Дякую за швидку відповідь і гарного дня.",
    ],
    "el": [
        "Καλημέρα σας, η συνάντηση μεταφέρθηκε για την Πέμπτη.",
        "Ευχαριστώ πολύ για τη βοήθεια με την αναφορά.",
        "Ο καιρός στην Αθήνα είναι υπέροχος σήμερα.",
    ],
    "ja": [
        "明日の会議は十時からです。よろしくお願いします。",
        "新しいバージョンをリリースしました。",
    ],
    "zh": [
        "明天上午十点开会,请准时参加。",
        "谢谢你的帮助,问题已经解决了。",
    ],
    "ko": ["내일 회의는 오전 열 시에 시작합니다.", "도와주셔서 감사합니다."],
    "ar": ["مرحبا، الاجتماع غدا في الساعة العاشرة.", "شكرا جزيلا على المساعدة."],
    "he": ["שלום, הפגישה נדחתה ליום חמישי.", "תודה רבה על העזרה."],
    "hi": ["नमस्ते, कल सुबह दस बजे बैठक है।", "मदद के लिए धन्यवाद।"],
    "th": ["พรุ่งนี้มีประชุมตอนสิบโมงเช้า", "ขอบคุณสำหรับความช่วยเหลือ"],
}

ACCENTED = (
    "café crème brûlée naïve façade résumé déjà vu piñata jalapeño São Paulo Zürich Øresund "
    "Łódź Kraków Dvořák Škoda Ångström smörgåsbord Ærø Reykjavík Þórshöfn Ðakovo İzmir "
    "Şanlıurfa Bucureşti Nguyễn Trần Hà Nội Mỹ Tho crêpe über Straße Mädchen coöperate"
).split()


def phone(rnd: random.Random) -> str:
    d = lambda n: "".join(str(rnd.randrange(10)) for _ in range(n))  # noqa: E731
    return rnd.choice(
        [
            f"+44 20 {d(4)} {d(4)}",
            f"+1 ({d(3)}) {d(3)}-{d(4)}",
            f"+49 30 {d(8)}",
            f"+33 {d(1)} {d(2)} {d(2)} {d(2)} {d(2)}",
            f"0{d(3)}/{d(4)}-{d(3)}",
            f"+7 {d(3)} {d(3)}-{d(2)}-{d(2)}",
            f"+81-{d(2)}-{d(4)}-{d(4)}",
            f"({d(3)}) {d(3)}.{d(4)}",
        ]
    )


def date(rnd: random.Random) -> str:
    y, m, day = rnd.randint(1990, 2035), rnd.randint(1, 12), rnd.randint(1, 28)
    hh, mm = rnd.randint(0, 23), rnd.randint(0, 59)
    return rnd.choice(
        [
            f"{y}-{m:02d}-{day:02d}",
            f"{day:02d}/{m:02d}/{y}",
            f"{m}/{day}/{y}",
            f"{day:02d}.{m:02d}.{y}",
            f"{y}-{m:02d}-{day:02d} {hh:02d}:{mm:02d}",
            f"{y}/{m:02d}/{day:02d} {hh:02d}:{mm:02d}:{rnd.randint(0, 59):02d}",
        ]
    )


def ip(rnd: random.Random) -> str:
    if rnd.random() < 0.8:
        return ".".join(str(rnd.randint(1, 255)) for _ in range(4))
    return ":".join(f"{rnd.randrange(65536):x}" for _ in range(8))


def order(rnd: random.Random) -> str:
    d = lambda n: "".join(str(rnd.randrange(10)) for _ in range(n))  # noqa: E731
    return rnd.choice(
        [
            f"order #{d(6)}",
            f"ORD-{d(8)}",
            f"invoice {rnd.randint(2000, 2030)}-{d(5)}",
            f"ticket SEC-{d(5)}",
            f"PO {d(3)}-{d(7)}",
            f"tracking 1Z {d(3)} {rnd.choice('ABCEFWXY')}{rnd.choice('ABCEFWXY')}{d(1)}"
            f" {d(2)} {d(4)} {d(4)}",
            f"ref {d(2)}/{d(4)}/{d(2)}",
            f"v{rnd.randint(1, 9)}.{rnd.randint(0, 30)}.{rnd.randint(0, 99)}",
            f"{rnd.randint(1, 999)}.{d(2)} EUR",
        ]
    )


NUMBERS: dict[str, Callable[[random.Random], str]] = {
    "phone": phone,
    "date": date,
    "ip": ip,
    "order": order,
}


def innocent_corpus(rnd: random.Random, per_category: int) -> dict[str, list[str]]:
    """Category -> innocent messages: chat per language, accented words, numbers by kind."""
    out: dict[str, list[str]] = {}
    for lang, sentences in SENTENCES.items():
        out[f"chat:{lang}"] = [
            " ".join(rnd.choice(sentences) for _ in range(rnd.randint(1, 3)))
            for _ in range(per_category)
        ]
    out["accented words"] = [
        " ".join(rnd.choice(ACCENTED) for _ in range(rnd.randint(3, 12)))
        for _ in range(per_category)
    ]
    for kind, make in NUMBERS.items():
        out[f"numbers:{kind}"] = [
            " ".join(make(rnd) for _ in range(rnd.randint(1, 4))) for _ in range(per_category)
        ]
    out["mixed"] = [
        f"{rnd.choice(rnd.choice(list(SENTENCES.values())))} {make(rnd)}"
        for make in rnd.choices(list(NUMBERS.values()), k=per_category)
    ]
    return out


# --- worst-case events ------------------------------------------------------------------------

EVENT_LIMIT = 65_536


def synapse_size(event: dict[str, Any]) -> int:
    return len(json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode())


def message(body: str, **content: Any) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "sender": "@mallory:corp.example",
        "room_id": "!room:corp.example",
        "event_id": "$worst",
        "content": {"msgtype": "m.text", "body": body, **content},
    }


def fill(unit: str, size: int = EVENT_LIMIT) -> dict[str, Any]:
    """A message whose body repeats ``unit`` to just under ``size`` bytes (Synapse's measure)."""
    overhead = synapse_size(message(""))
    per_char = len(json.dumps(unit, ensure_ascii=False)[1:-1].encode()) / len(unit)
    chars = int((size - overhead) / per_char)
    body = (unit * (chars // len(unit) + 1))[:chars]
    event = message(body)
    while synapse_size(event) > size:
        body = body[: -max(1, len(body) // 1000)]
        event = message(body)
    return event


def overridden(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its body behind one right-to-left override (same size or smaller)."""
    body = event["content"]["body"]
    return message("\u202e" + body[3:])


def nested(size: int = EVENT_LIMIT, depth: int = 12) -> dict[str, Any]:
    """Many small custom keys, deeply nested: the walk over every string of the content."""
    leaf = {f"k{i}": "falco nightingal 4111 1111" for i in range(8)}
    node: Any = leaf
    for _ in range(depth):
        node = {"a": node, "b": ["x", "y", leaf]}
    content: dict[str, Any] = {"msgtype": "m.text", "body": "hi", "custom": []}
    event = {"type": "m.room.message", "sender": "@m:x", "room_id": "!r:x", "content": content}
    while synapse_size(event) < size - 4096:
        content["custom"].append(node)
    return event


def html(size: int = EVENT_LIMIT) -> dict[str, Any]:
    unit = "<b>fal</b><i>co</i><a href='x'>n</a><br>"
    count = (size - 400) // (2 * len(unit))
    event = message("x", format="org.matrix.custom.html", formatted_body=unit * count)
    event["content"]["body"] = "nightingal " * (count * len(unit) // 11 // 2)
    while synapse_size(event) > size:
        event["content"]["body"] = event["content"]["body"][:-1000]
    return event


def luhn_failing_groups(count: int) -> str:
    """4-digit groups chosen so that no 16-digit window of them passes Luhn: every window of
    a run must then be checked, none ends the search early."""
    from bridge.policy.dlp import luhn_valid

    rnd = random.Random(5)
    groups = [f"{rnd.randrange(10_000):04d}" for _ in range(3)]
    while len(groups) < count:
        candidate = f"{rnd.randrange(10_000):04d}"
        if not luhn_valid("".join(groups[-3:]) + candidate):
            groups.append(candidate)
    return " ".join(groups) + " "


def worst_cases(keywords: list[str], size: int = EVENT_LIMIT) -> dict[str, dict[str, Any]]:
    """Family -> a legal event (at most ``size`` bytes) that makes that part work hardest."""
    prefixes = " ".join(k[:-1] for k in keywords[:2000])
    glued = "".join(keywords[:50])  # keyword hits everywhere, none on a word boundary
    return {
        "ascii chat": fill("deploy the release tomorrow, lunch on friday? ", size),
        "combining marks (10 per letter)": fill("e" + "\u0301\u0302\u0303\u0304\u0306" * 2, size),
        "combining marks alone": fill("\u0301", size),
        "accented prose (precomposed)": fill("Héllo wörld, café crème à Zürich ", size),
        "confusables (Cyrillic, Greek, small caps)": fill("ѕесгеt ΡΑΣΣ ꜱᴇᴄʀᴇᴛ ɑβγ ", size),
        "math alphanumerics (astral, NFKD)": fill("\U0001d42c\U0001d41e\U0001d41c ", size),
        "CJK": fill("明天上午十点开会请准时参加", size),
        "bidi overrides alternating": fill("\u202eab\u202c", size),
        "bidi overrides nested": fill("\u202ea\u202db", size),
        "punctuation runs": fill("a.-/_!? ", size),
        "digit run, single digits": fill("1 ", size),
        "digit run, 4-digit groups": fill("4111 ", size),
        "digit run, mixed separators": fill("4111.1111/1111 - ", size),
        "digit run, no window passes Luhn": fill(luhn_failing_groups(size // 5), size),
        # Text after a right-to-left override is read as shown and as typed (twice).
        "digit run, mixed separators, overridden": overridden(fill("4111.1111/1111 - ", size)),
        "digit run, 4-digit groups, overridden": overridden(fill("4111 ", size)),
        "digits, no separators": fill("4111111111111112", size),
        "keyword prefixes": fill(prefixes + " ", size),
        "keywords glued (boundary checks)": fill(glued, size),
        "IBAN-like": fill("GB82 ", size),
        "PEM headers": fill("-----BEGIN ", size),
        "JWT-like": fill("eyJaaaa.", size),
        "HTML tags": html(size),
        "nested custom keys": nested(size),
    }
