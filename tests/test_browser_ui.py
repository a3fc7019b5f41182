"""End to end in headless Chromium against the running stack: every tab streams answers (English and
Chinese), a battle vote is logged and moves the leaderboard, and the page talks only to 127.0.0.1.

Needs Debian's `chromium` (+ `fonts-wqy-microhei` for readable Chinese screenshots) and the `playwright`
Python package, which drives /usr/bin/chromium (never `playwright install`: no browser download here).
Screenshots go to $CPU_ARENA_ARTIFACTS (default: pytest's tmp dir).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
MAX_TOKENS = 24  # CPU time: short answers are enough to see streaming, stats and votes
ANSWER_TIMEOUT_MS = 240_000
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

pytestmark = [pytest.mark.stack, pytest.mark.browser, pytest.mark.slow]


def _answers_done_js(prefix: str, sides: int) -> str:
    # Done when every side's last answer carries its stats line and nothing is still generating.
    return f"""() => [...Array({sides}).keys()].every(i => {{
        const el = document.querySelector('#{prefix}_chatbot_' + i);
        if (!el) return false;
        const t = el.innerText;
        return t.includes('TTFT') && !t.includes('generating') && !t.includes('▌');
    }})"""


def _ask(page, prefix: str, question: str, sides: int) -> list[str]:
    page.locator(f"#{prefix}_max_tokens input[type=number]").fill(str(MAX_TOKENS))
    page.locator(f"#{prefix}_max_tokens input[type=number]").press("Enter")
    page.locator(f"#{prefix}_input textarea").fill(question)
    page.locator(f"#{prefix}_send").click()
    page.wait_for_function(_answers_done_js(prefix, sides), timeout=ANSWER_TIMEOUT_MS, polling=500)
    return [page.locator(f"#{prefix}_chatbot_{i}").inner_text() for i in range(sides)]


def _open_tab(page, elem_id: str, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_selector(f"#{elem_id}", state="visible", timeout=30_000)


def _open_params(page, prefix: str) -> None:
    page.locator(f"#{prefix}_params").get_by_text("Parameters").first.click()
    page.wait_for_selector(f"#{prefix}_max_tokens input[type=number]", state="visible", timeout=10_000)


def _votes(run_dir: Path) -> list[dict]:
    out = []
    for f in glob.glob(str(run_dir / "conversations" / "*conv.json")):
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("type") in ("leftvote", "rightvote", "tievote", "bothbad_vote"):
                out.append(rec)
    return out


def _artifacts(tmp_path: Path) -> Path:
    d = Path(os.environ.get("CPU_ARENA_ARTIFACTS") or tmp_path / "artifacts") / "screenshots"
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_browser_session(ui_url: str, run_dir: Path, served: list[str], shots: Path, profile: Path) -> None:
    from playwright.sync_api import sync_playwright

    requests_seen: list[str] = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = ctx.new_page()
            page.on("request", lambda r: requests_seen.append(r.url))
            page.goto(ui_url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_selector("#arena_header", timeout=60_000)
            assert "cpu-arena" in page.title()
            assert "LMSYS" not in page.content()

            # Leaderboard before any vote.
            _open_tab(page, "leaderboard_refresh", "🏆 Leaderboard")
            page.locator("#leaderboard_refresh").click()
            page.wait_for_function("() => document.querySelector('#leaderboard_note').innerText.length > 0")
            before = page.locator("#leaderboard_table").inner_text()

            # Anonymous battle, English; vote; names revealed.
            _open_tab(page, "battle_input", "⚔️ Arena (battle)")
            _open_params(page, "battle")
            n_votes = len(_votes(run_dir))
            answers = _ask(page, "battle", "What is the capital of France? Answer in one sentence.", 2)
            for a in answers:
                assert "Model A" in a or "Model B" in a  # anonymous until the vote
                assert not any(m in a for m in served)
            page.locator("#battle_leftvote").click()
            page.wait_for_function("() => document.querySelector('#battle_reveal_0').innerText.includes('Model A:')",
                                   timeout=30_000)
            revealed = [page.locator(f"#battle_reveal_{i}").inner_text() for i in range(2)]
            names = [next(m for m in sorted(served, key=len, reverse=True) if m in r) for r in revealed]
            assert names[0] != names[1] and set(names) <= set(served)
            page.screenshot(path=str(shots / "battle.png"), full_page=True)
            votes = _votes(run_dir)
            assert len(votes) == n_votes + 1
            assert votes[-1]["type"] == "leftvote" and votes[-1]["models"] == ["", ""]
            assert [s["model_name"] for s in votes[-1]["states"]] == names

            # Side-by-side (named), Chinese: no replacement characters ever reach the page.
            _open_tab(page, "named_input", "⚔️ Arena (side-by-side)")
            _open_params(page, "named")
            answers = _ask(page, "named", "请用一句话介绍一下北京。", 2)
            for a, m in zip(answers, served[:2], strict=True):
                assert "\ufffd" not in a
                assert m in a and "tok/s" in a
            page.screenshot(path=str(shots / "side_by_side.png"), full_page=True)

            # Direct chat, English.
            _open_tab(page, "direct_input", "💬 Direct chat")
            _open_params(page, "direct")
            (answer,) = _ask(page, "direct", "Say hello in one short sentence.", 1)
            assert served[0] in answer and "TTFT" in answer
            page.screenshot(path=str(shots / "direct_chat.png"), full_page=True)

            # Leaderboard after the vote: refreshed without a restart, now ranks both battle models.
            _open_tab(page, "leaderboard_refresh", "🏆 Leaderboard")
            page.locator("#leaderboard_refresh").click()
            page.wait_for_function(
                f"() => {json.dumps(names)}.every(n => document.querySelector('#leaderboard_table').innerText.includes(n))",
                timeout=30_000)
            after = page.locator("#leaderboard_table").inner_text()
            assert after != before
            page.screenshot(path=str(shots / "leaderboard.png"), full_page=True)
        finally:
            ctx.close()

    outside = sorted({u for u in requests_seen
                      if urlparse(u).scheme in ("http", "https", "ws", "wss")
                      and urlparse(u).hostname not in LOCAL_HOSTS})
    assert not outside, f"the page requested outside hosts: {outside}"


def test_arena_in_browser(stack, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is missing: apt-get install -y chromium chromium-driver fonts-wqy-microhei")
    served = [m.name for m in stack.cfg.models]
    run_browser_session(stack.ui_url, stack.run_dir, served, _artifacts(tmp_path), tmp_path / "chromium-profile")
