"""The chat page at `/` in headless Chromium (Debian's), driven by Playwright: a scripted
two-turn conversation streams answers and keeps the history; Stop ends a long reply.
Run by scripts/test-serve.sh; with KILN_SCREENSHOT=PATH it also saves a screenshot."""
import os

from playwright.sync_api import sync_playwright

URL, KEY = os.environ["KILN_PAGE"], os.environ["KILN_KEY"]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def check(name, ok, detail=""):
    assert ok, f"{name}: {detail}"
    print(f"ok  {name}")


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
    page = browser.new_page(viewport={"width": 900, "height": 640})
    page.goto(URL)
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    check("the page lists the model", page.eval_on_selector("#model", "s => s.value") == "smol")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")

    def turn(text, n):
        page.fill("#input", text)
        page.press("#input", "Enter")
        page.wait_for_selector(f".assistant:nth-of-type({2 * n})[data-done]", timeout=60_000)
        return page.inner_text(f".msg:nth-of-type({2 * n})")

    first = turn("What is the capital of France?", 1)
    check("a streamed answer appears", "Paris" in first, first)
    second = turn("And of Italy?", 2)
    check("the second turn is answered", len(second.strip()) > 0, second)
    check("the conversation is kept", page.locator(".msg").count() == 4)
    check("no error shown", page.locator(".error").count() == 0)
    if os.environ.get("KILN_SCREENSHOT"):
        page.screenshot(path=os.environ["KILN_SCREENSHOT"])

    # Stop a long reply.
    page.fill("#max_tokens", "900")
    page.fill("#temperature", "1")
    page.fill("#input", "Write a very long story about a dragon.")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.assistant:nth-of-type(6)') || {}).textContent?.length > 20",
                           timeout=60_000)
    page.click("#stop")
    page.wait_for_selector(".assistant:nth-of-type(6)[data-done]", timeout=10_000)
    meta = page.inner_text(".assistant:nth-of-type(6) .meta")
    check("Stop ends the reply", meta.startswith("stopped"), meta)
    check("the page can send again", not page.is_disabled("#send"))
    browser.close()
print("all chat-page checks passed")
