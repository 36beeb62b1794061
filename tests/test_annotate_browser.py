"""The annotation UI in a real Chromium: two annotators (one with a name in Chinese, Cyrillic and an emoji),
keys and clicks, a cross-site form that tries to undo a label, a killed server, export, training.

Starts `preftune annotate serve` in a subprocess on a free localhost port and drives Debian's Chromium
(/usr/bin/chromium) with playwright's sync API. Set PREFTUNE_SCREENSHOT=docs/img/annotate.png to also
write the screenshot of the label page used in the documentation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]

# CI sets PREFTUNE_REQUIRE_BROWSER=1 (.ci/run): there a missing Chromium fails the test instead of skipping it,
# so the browser test can never silently stop running.
REQUIRE_BROWSER = os.environ.get("PREFTUNE_REQUIRE_BROWSER") == "1"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists() and not REQUIRE_BROWSER,
                       reason=f"{CHROMIUM} not found: install it with `apt-get install chromium` (make test does)"),
]

# Six pairs in the spirit of the project's Shakespeare demo; two long responses show the wrapping.
PAIRS = [
    {"prompt": "Continue the line: Shall I compare thee to a summer's day?",
     "response_a": "Thou art more lovely and more temperate:\nRough winds do shake the darling buds of May,\n"
                   "And summer's lease hath all too short a date.",
     "response_b": "Summer days are warm. I like summer. The sun is out and the day is long and it is a "
                   "nice day to compare things to, because summer is a season that many people enjoy "
                   "and it comes once every year after spring and before autumn."},
    {"prompt": "Continue the line: To be, or not to be, that is the question:",
     "response_a": "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune,",
     "response_b": "The question is to be. Or not. Yes."},
    {"prompt": "Write one line a king might say before battle.",
     "response_a": "Once more unto the breach, dear friends, once more!",
     "response_b": "Let us go and fight now, everyone, please."},
    {"prompt": "Give a short greeting in the style of Shakespeare.",
     "response_a": "Good morrow, gentle friend, and well met.",
     "response_b": "Hail and well met, good sir; how fares the day?"},
    {"prompt": "Describe the sea in one sentence.",
     "response_a": "The sea, a restless mirror of the sky, murmurs of far shores.",
     "response_b": "It is big and wet."},
    {"prompt": "Finish: All the world's a stage,",
     "response_a": "And all the men and women merely players;",
     "response_b": "and the stage is a world, and the world is big."},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "preftune", "annotate", "serve", "--db", str(db), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).text.startswith("ok"):
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not start in 30 s:\n{log.read_text()}")


class Annotator:
    """One person in their own browser context (own cookies); remembers what they answered."""

    def __init__(self, browser, base: str, name: str, group: str) -> None:
        self.page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
        self.base, self.name, self.expected = base, name, []       # [(pair_id, "a"|"b"|"tie"|"skip")]
        self.page.goto(base + "/")
        self.page.fill("#name", name)
        self.page.fill("#group", group)
        with self.page.expect_navigation():
            self.page.click("text=Start labelling")

    def current(self) -> tuple[str, str]:
        return self.page.input_value("input[name=pair_id]"), self.page.input_value("input[name=order]")

    def answer(self, side: str, *, key: str | None = None, button: str | None = None) -> None:
        """Answer by pressing ``key`` or clicking ``button``; record the expected stored choice."""
        pair_id, order = self.current()
        with self.page.expect_navigation():
            if key is not None:
                self.page.keyboard.press(key)
            else:
                self.page.click(f"button:has-text('{button}')")
        mapped = {"left": "a" if order == "ab" else "b", "right": "b" if order == "ab" else "a"}
        self.expected.append((pair_id, mapped.get(side, side)))

    def undo(self) -> None:
        with self.page.expect_navigation():
            self.page.keyboard.press("u")
        undone, _ = self.expected.pop()
        assert self.current()[0] == undone, "undo shows the undone pair again"

    def progress(self) -> str:
        return self.page.inner_text("#progress-text")


# A page on another site whose button posts to the annotation server's /undo as the victim: the browser
# sends the victim's cookies along, so only the server's Origin check and session token stop it.
EVIL_SITE = "http://evil.example/attack.html"
EVIL_PAGE = """<!doctype html><meta charset="utf-8"><title>free prizes</title>
<form method="post" action="{base}/undo"><input type="hidden" name="annotator" value="{name}">
<button id="go" type="submit">claim</button></form>"""
BOB = "李雷 Дмитрий 😀"


def stored(db: Path) -> dict[str, list[tuple[str, str]]]:
    from preftune.data.annotations import AnnotationStore

    out: dict[str, list[tuple[str, str]]] = {}
    for lab in AnnotationStore(db).labels():
        out.setdefault(lab.annotator, []).append((lab.pair_id, lab.choice))
    return out


def test_two_annotators_kill_restart_export_train(tmp_path: Path, tiny_model_dir: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found and PREFTUNE_REQUIRE_BROWSER=1: `make chromium` (as root) installs it")
    from playwright.sync_api import sync_playwright
    from typer.testing import CliRunner

    from preftune.cli import app

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    db, log, port = tmp_path / "annotations.sqlite", tmp_path / "server.log", free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(db, port, log, "--pairs", str(pairs), "--per-pair", "2", "--seed", "1")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            alice = Annotator(browser, base, "alice", "poets")
            bob = Annotator(browser, base, BOB, "critics")
            assert alice.progress() == "0 of 6 labelled; 6 left"
            alice.answer("left", button="Left better")
            shot = tmp_path / "annotate.png"                # the label page, as in docs/annotate.md
            alice.page.locator("body").screenshot(path=str(shot))
            if os.environ.get("PREFTUNE_SCREENSHOT"):
                shutil.copy(shot, os.environ["PREFTUNE_SCREENSHOT"])
            alice.answer("right", key="2")
            alice.answer("skip", key="s")
            alice.undo()                                    # the skip is taken back ...
            alice.answer("tie", key="0")                    # ... and the same pair answered as a tie
            bob.answer("right", button="Right better")
            bob.answer("left", key="1")
            bob.answer("skip", key="s")
            assert alice.progress() == "3 of 6 labelled; 3 left"
            assert stored(db) == {"alice": alice.expected, BOB: bob.expected}
            assert bob.page.inner_text(".who strong") == BOB

            for who in (alice, bob):                        # another site tries to undo their last label
                who.page.route(EVIL_SITE, lambda route, name=who.name: route.fulfill(
                    content_type="text/html", body=EVIL_PAGE.format(base=base, name=name)))
                who.page.goto(EVIL_SITE)
                with who.page.expect_response(base + "/undo") as answer:
                    who.page.click("#go")
                assert answer.value.status == 403 and "another site" in who.page.inner_text(".problem")
                who.page.goto(base + "/label")
            assert stored(db) == {"alice": alice.expected, BOB: bob.expected}, "a cross-site POST changed labels"

            server.send_signal(signal.SIGKILL)              # no shutdown, no chance to flush anything
            server.wait(timeout=10)
            assert stored(db) == {"alice": alice.expected, BOB: bob.expected}, "a saved label was lost"
            server = start_server(db, port, log)            # restart: the pairs are already in the db

            for who in (alice, bob):
                who.page.goto(base + "/label")              # the cookie still says who they are
            assert alice.progress() == "3 of 6 labelled; 3 left"
            for who in (alice, bob):
                keys = iter(["1", "2", "1", "0", "1", "2"])
                while who.page.locator("input[name=pair_id]").count():
                    key = next(keys)
                    who.answer({"1": "left", "2": "right", "0": "tie"}[key], key=key)
                assert "All done" in who.page.content()
                assert who.progress() == "6 of 6 labelled; 0 left"
            browser.close()
    finally:
        server.kill()
        server.wait(timeout=10)

    assert stored(db) == {"alice": alice.expected, BOB: bob.expected}
    n_skip = sum(c == "skip" for e in (alice.expected, bob.expected) for _, c in e)
    n_tie = sum(c == "tie" for e in (alice.expected, bob.expected) for _, c in e)
    runner = CliRunner()
    prefs = tmp_path / "prefs.jsonl"
    res = runner.invoke(app, ["annotate", "export", "--db", str(db), "--output", str(prefs)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert len(rows) == 12 - n_skip - n_tie and {r["group"] for r in rows} == {"poets", "critics"}
    res = runner.invoke(app, ["annotate", "stats", "--db", str(db)])
    assert res.exit_code == 0 and "Cohen's kappa" in res.output, res.output

    config = tmp_path / "reward.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {prefs}\noutput_dir: {tmp_path / 'rm'}\n"
                      "max_steps: 2\nbatch_size: 2\nmax_length: 64\nreport_to: none\n")
    res = subprocess.run([sys.executable, "-m", "preftune", "train", "reward", str(config)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "rm" / "final" / "config.json").exists()
    metrics = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss"] == m["loss"] for m in metrics if "loss" in m)     # no NaN
