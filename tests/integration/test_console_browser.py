"""The compliance console in a real browser (Debian's Chromium, driven headless by
Playwright) against a real Synapse and the bridge as a child process.

Nothing is downloaded: Playwright launches /usr/bin/chromium (``apt-get install chromium``).
Screenshots of the main pages are written to ``artifacts/console/`` (git-ignored) and,
for the README, ``docs/console-overview.png`` is refreshed when
``BRIDGE_CONSOLE_SCREENSHOT_DOCS=1``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack, running_stack
from matrix_client import MatrixError, wait_for

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "console"
CARD = "4111 1111 1111 1111"
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'

if not CHROMIUM.exists():
    print(f"console browser tests skipped: {CHROMIUM} is missing (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.async_api")


@pytest.fixture(scope="module")
def console_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Synapse + a bridge with the console on (plain HTTP: Secure cookies off)."""
    yield from running_stack(
        tmp_path_factory.mktemp("console-stack"),
        {
            "console": {"enabled": True, "secure_cookies": False},
            "dlp": {"detectors": {"card": "block"}},
        },
    )


@pytest.fixture(scope="module")
async def browser(console_stack: Stack) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        await b.close()


@pytest.fixture(scope="module")
async def messages(console_stack: Stack) -> dict[str, str]:
    """A room with a findable message, a hostile one, and a refused card number."""
    async with console_stack.client(console_stack.admin) as admin:
        room = await admin.create_room(name="console <b>room</b>")
        found = await admin.send_text(room, "quarterly pelican report is ready")
        hostile = await admin.send_text(room, XSS)
        try:
            await admin.send_text(room, f"my card {CARD}")
        except MatrixError:
            pass  # refused by the gate: an incident
    return {"room": room, "found": found, "hostile": hostile}


def console_url(stack: Stack, path: str = "/") -> str:
    return f"{stack.dev.bridge_url}/console{path}"


class Watch:
    """Dialogs and console messages of a page: nothing may run."""

    def __init__(self, page: Any) -> None:
        self.dialogs: list[str] = []
        self.console: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", lambda msg: self.console.append(msg.text))

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()


async def login(browser: Any, stack: Stack, user: str, password: str) -> tuple[Any, Any, Watch]:
    context = await browser.new_context(accept_downloads=True)
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(console_url(stack, "/login"))
    await page.get_by_label("User name or Matrix ID").fill(user)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_load_state()
    return context, page, watch


async def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def archived(page: Any, stack: Stack, words: str) -> None:
    """Wait until a search for ``words`` finds something (the worker archives quickly)."""

    async def found() -> bool:
        await page.goto(console_url(stack, "/archive?go=1&text=" + words.replace(" ", "+")))
        return await page.locator("table.results tbody a").count() > 0

    await wait_for(found, timeout=30, message=f"{words!r} in the archive")


async def test_admin_logs_in_and_sees_the_overview_with_charts(
    browser: Any, console_stack: Stack, messages: dict[str, str]
) -> None:
    context, page, watch = await login(browser, console_stack, "admin", "admin-pw")
    await page.get_by_role("heading", name="Overview").wait_for()
    assert "@admin:localhost (admin)" in await page.inner_text("header")
    bars = page.locator('svg[data-chart="events"] rect.bar')
    assert await bars.count() > 0  # events archived today: at least one bar drawn
    assert await page.locator("svg[data-chart]").count() == 4
    box = await bars.first.bounding_box()
    assert box is not None and box["height"] > 0 and box["width"] > 0
    # every chart has its numbers as a table (the text alternative)
    assert await page.locator("figure.chart table caption").count() == 4
    # keyboard: the first Tab reaches the skip link, Enter moves focus to the content
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    await page.keyboard.press("Enter")
    assert await page.evaluate("document.activeElement.id") == "main"
    await page.get_by_role("button", name="Verify the archive now").click()
    await page.get_by_text("intact").first.wait_for()
    await shot(page, "overview")
    if os.environ.get("BRIDGE_CONSOLE_SCREENSHOT_DOCS"):
        shutil.copy(ARTIFACTS / "overview.png", ROOT / "docs" / "console-overview.png")
    for path, name in (
        ("/incidents", "incidents"),
        ("/policies", "policies"),
        ("/rooms", "rooms"),
        ("/holds", "holds"),
        ("/activity", "activity"),
    ):
        await page.goto(console_url(console_stack, path))
        await shot(page, name)
    await page.goto(console_url(console_stack, "/incidents"))
    assert "detector:card" in await page.inner_text("main")
    assert CARD not in await page.content()  # masked
    assert watch.dialogs == []
    await context.close()


async def test_a_search_finds_a_message_and_exports_it(
    browser: Any, console_stack: Stack, messages: dict[str, str]
) -> None:
    context, page, _ = await login(browser, console_stack, "auditor", "auditor-pw")
    await archived(page, console_stack, "pelican")
    await page.goto(console_url(console_stack, "/archive"))
    await page.get_by_label("Room ID").fill(messages["room"])
    await page.get_by_label("Words").fill("pelican")
    await page.get_by_role("button", name="Search").click()
    row = page.locator("table.results tbody tr", has_text="quarterly pelican report")
    await row.wait_for()
    assert await page.locator("table.results tbody tr").count() == 1
    await shot(page, "archive")
    async with page.expect_download() as info:
        await page.get_by_role("button", name="Export").click()
    download = await info.value
    lines = Path(await download.path()).read_text("utf-8").splitlines()
    exported = [json.loads(line) for line in lines]
    assert [r["event_id"] for r in exported] == [messages["found"]]
    assert exported[0]["data"]["content"]["body"] == "quarterly pelican report is ready"
    # the record's decrypted view
    await row.get_by_role("link").click()
    await page.get_by_role("heading", name="Content").wait_for()
    assert messages["found"] in await page.inner_text("main")
    await context.close()


async def test_hostile_message_text_is_shown_as_text_and_runs_nothing(
    browser: Any, console_stack: Stack, messages: dict[str, str]
) -> None:
    context, page, watch = await login(browser, console_stack, "auditor", "auditor-pw")
    await archived(page, console_stack, "window.__pwned")
    cell = page.locator("table.results td.body", has_text="<script>window.__pwned = 1</script>")
    await cell.first.wait_for()
    assert XSS in await cell.first.inner_text()
    main_scripts = await page.evaluate(
        "document.querySelectorAll('main script, main img, script').length"
    )
    assert main_scripts == 0
    assert await page.evaluate("typeof window.__pwned") == "undefined"
    await page.get_by_role("link", name=f"#{await _seq_of(page)}").first.click()
    await page.get_by_role("heading", name="Content").wait_for()
    assert "<script>window.__pwned" in await page.inner_text("pre.json")
    assert await page.evaluate("document.querySelectorAll('script, img').length") == 0
    assert await page.evaluate("typeof window.__pwned") == "undefined"
    assert watch.dialogs == [] and not any("pwned" in m for m in watch.console)
    await context.close()


async def _seq_of(page: Any) -> str:
    row = page.locator("table.results tbody tr", has_text="window.__pwned").first
    return (await row.locator("a").first.inner_text()).lstrip("#")


async def test_an_auditor_cannot_add_a_hold(browser: Any, console_stack: Stack) -> None:
    context, page, _ = await login(browser, console_stack, "auditor", "auditor-pw")
    await page.goto(console_url(console_stack, "/holds"))
    assert "Only admins can add or lift legal holds" in await page.inner_text("main")
    assert await page.get_by_role("button", name="Add hold").count() == 0
    # posting the form anyway, with this session's valid CSRF token, is refused
    token = await page.get_attribute('form[action$="/logout"] input[name="csrf"]', "value")
    resp = await page.request.post(
        console_url(console_stack, "/holds/add"),
        form={"csrf": token or "", "scope": "room", "target": "!x:localhost", "reason": "r"},
    )
    assert resp.status == 403 and "Only admins" in await resp.text()
    await page.goto(console_url(console_stack, "/holds"))
    assert "!x:localhost" not in await page.inner_text("main")
    await context.close()


async def test_a_user_without_a_role_is_refused(browser: Any, console_stack: Stack) -> None:
    context, page, _ = await login(browser, console_stack, "stranger", "stranger-pw")
    await page.get_by_role("heading", name="No access to the compliance console").wait_for()
    assert "@stranger:localhost" in await page.inner_text("main")
    await page.goto(console_url(console_stack, "/archive"))
    assert page.url.endswith("/console/login")
    await context.close()


async def test_a_form_posted_without_its_csrf_token_is_refused(
    browser: Any, console_stack: Stack
) -> None:
    context, page, _ = await login(browser, console_stack, "admin", "admin-pw")
    await page.goto(console_url(console_stack, "/holds"))
    await page.get_by_label("Room ID or user ID").fill("!csrf:localhost")
    await page.locator("#reason").fill("no token")
    await page.evaluate(
        "document.querySelector('form[action$=\"/holds/add\"] input[name=csrf]').remove()"
    )
    await page.get_by_role("button", name="Add hold").click()
    await page.get_by_role("heading", name="Form refused").wait_for()
    await page.goto(console_url(console_stack, "/holds"))
    assert "!csrf:localhost" not in await page.inner_text("main")
    # with its token, the same form works (an admin may add holds)
    await page.get_by_label("Room ID or user ID").fill("!csrf:localhost")
    await page.locator("#reason").fill("with token")
    await page.get_by_role("button", name="Add hold").click()
    await page.get_by_text("Hold added.").wait_for()
    await shot(page, "holds-admin")
    await context.close()
