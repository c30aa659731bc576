"""
Screenshots of the chat page for the docs: alice's and bob's tab in one room, side by side.

Starts its own daphne (tests/servers.py) on a throwaway SQLite database, so it never touches
var/; needs Debian's Chromium (scripts/browser-deps). Run by hand:

    .venv/bin/python scripts/screenshot.py     # docs/chat-alice.png, docs/chat-bob.png
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402

from tests.servers import Deployment, Session  # noqa: E402
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

USERS = {"alice": "alice-pass-1", "bob": "bob-pass-1", "carol": "carol-pass-1"}
CONVERSATION = [
    ("alice", "Morning! Did the deploy go out?"),
    ("bob", "Yes, 09:40. Two server processes behind the load balancer."),
    ("alice", "Nice. I'll close my laptop lid and see if my tabs catch up."),
    ("carol", "Reload away: your tab keeps its client id and its queue."),
    ("bob", "And anything you type offline waits in the outbox until the socket is back."),
    ("alice", "Sent from the train, no signal :)"),
]


def tab(browser: Browser, base_url: str, user: str) -> Page:
    """A logged-in tab of `user` on the lobby."""
    session = Session(base_url)
    session.login(user, USERS[user])
    context = browser.new_context(viewport={"width": 960, "height": 620}, device_scale_factor=1)
    context.add_cookies(
        [{"name": c.name, "value": c.value or "", "url": base_url} for c in session.jar]
    )
    page = context.new_page()
    page.goto(f"{base_url}/#lobby")
    page.wait_for_function("window.relay && window.relay.state === 'online'")
    page.wait_for_selector("#room-title:has-text('lobby')")
    return page


def main() -> None:
    """Start a server, stage a short conversation and write the screenshots into docs/."""
    out = ROOT / "docs"
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        deployment = Deployment(Path(tmp), SERVE_STATIC="1")
        try:
            for name, password in USERS.items():
                deployment.create_user(name, password)
            deployment.create_room("lobby", list(USERS))
            deployment.create_room("design", ["alice", "bob"])
            server = deployment.start()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
                )
                try:
                    pages = {user: tab(browser, server.base_url, user) for user in USERS}
                    for user, text in CONVERSATION[:-1]:
                        pages[user].fill("#composer-input", text)
                        pages[user].press("#composer-input", "Enter")
                        pages[user].wait_for_selector(f".msg.sent:has-text({text!r})")
                    # The last one stays pending: alice's tab goes offline before she sends it.
                    pages["alice"].evaluate("window.relay.disconnect()")
                    pages["alice"].fill("#composer-input", CONVERSATION[-1][1])
                    pages["alice"].press("#composer-input", "Enter")
                    pages["alice"].wait_for_selector(".msg.pending")
                    pages["bob"].wait_for_selector(
                        "#people .person:not(.online)[data-user='alice']"
                    )
                    pages["carol"].type("#composer-input", "Sounds")
                    pages["bob"].wait_for_selector("#typing:has-text('carol is typing')")
                    pages["alice"].screenshot(path=str(out / "chat-alice.png"))
                    pages["bob"].evaluate("document.getElementById('composer-input').blur()")
                    pages["bob"].screenshot(path=str(out / "chat-bob.png"))
                finally:
                    browser.close()
        finally:
            deployment.close()
    print(f"wrote {out / 'chat-alice.png'} and {out / 'chat-bob.png'}")


if __name__ == "__main__":
    main()
