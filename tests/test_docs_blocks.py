"""The docs run: every command and Python block of README.md and docs/*.md, in the order of its page.

Each page runs in a fresh directory set up as a checkout's root (``examples/``, ``tests/data/`` and
``benchmarks/`` copied in; ``.venv/bin`` first on PATH; nothing downloaded; caches and HOME inside the
directory): ``tests/docs_blocks.py`` says how each kind of block runs and what the
``<!-- docs-test: ... -->`` markers mean. A failure names the block's file and line and shows its output.
Blocks marked ``slow`` run only with PREFTUNE_DOCS_SLOW=1. To run one page by hand and see each block's
time: ``python tests/docs_blocks.py docs/rlhf.md`` (``--keep DIR`` keeps what it wrote).

The demo's claims are checked here too: ``preftune demo --help``, docs/demo.md's stage table and the
report's "Reproduce" line name the same stages and presets as the code.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from docs_blocks import (
    DOCS,
    ROOT,
    RUNNABLE,
    DocsFormatError,
    WarmServer,
    cold,
    console_steps,
    missing_output,
    parse,
    run_page,
)


def _has_commands(page: Path) -> bool:
    try:
        return any(b.runnable for b in parse(page))
    except DocsFormatError:
        return True               # its test reports the error (a malformed page must not stop collection)


RUNNABLE_PAGES = [p for p in DOCS if _has_commands(p)]


@pytest.fixture(scope="module")
def warm():
    """One warm server for every page (None with PREFTUNE_DOCS_COLD=1): see tests/docs_blocks.py."""
    server = None if cold() else WarmServer()
    if server is not None:
        server.wait()
    yield server
    if server is not None:
        server.close()


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=[p.name for p in RUNNABLE_PAGES])
def test_page_runs_in_order(page: Path, tmp_path: Path, warm) -> None:
    outcome = run_page(page, tmp_path, warm=warm)
    assert not outcome.failures, "\n\n".join(outcome.failures)
    assert outcome.ran, f"{page.name}: no block ran"


def test_every_block_is_classified_and_every_marker_is_well_formed() -> None:
    """Every fence of every page has a language; a command block either runs or carries a marker that
    says why not (parse raises DocsFormatError otherwise); each skip says why."""
    blocks = [b for page in DOCS for b in parse(page)]
    for b in blocks:
        assert b.lang, b.where
        if b.kind == "skip":
            assert b.arg and b.lang in RUNNABLE, b.where
    kinds = {b.kind for b in blocks if b.lang in RUNNABLE}
    assert "run" in kinds and "skip" in kinds
    ran = sum(b.runnable and b.kind == "run" for b in blocks)
    not_run = sum(b.lang in RUNNABLE and not b.runnable for b in blocks)
    assert ran > 4 * not_run, f"only {ran} command blocks run in the suite, {not_run} do not"


@pytest.mark.parametrize("text, message", [
    ("```\nls\n```\n", "without a language"),
    ("<!-- docs-test: skip -->\n```bash\nls\n```\n", "needs a reason"),
    ("<!-- docs-test: sometimes -->\n```bash\nls\n```\n", "unknown docs-test marker"),
    ("<!-- docs-test: skip (a GPU) -->\n\n```bash\nls\n```\n", "right before an opening fence"),
    ("<!-- docs-test:skip (no space) -->\n```bash\nls\n```\n", "malformed docs-test marker"),
    ("<!-- docs-test: file /etc/passwd -->\n```text\nx\n```\n", "one relative path"),
    ("<!-- docs-test: excerpt src/nowhere.py -->\n```python\nx\n```\n", "not a file of the checkout"),
    ("<!-- docs-test: slow -->\n```json\n{}\n```\n", "never runs"),
    ("```console\nls\n```\n", "starts with a `$ command` line"),
    ("```bash\nls\n", "never closed"),
    ("```rust\nfn main() {}\n```\n", "unknown code block language"),
])
def test_malformed_pages_are_refused_with_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    with pytest.raises(DocsFormatError, match=re.escape(message)) as info:
        parse(page)
    assert re.match(rf"{re.escape(str(page))}:\d+: ", str(info.value))


def test_a_failing_block_is_reported_with_its_file_line_and_output(tmp_path: Path, warm) -> None:
    """Through the warm server as in a fresh process: a block's exit status and output reach the report,
    the blocks before it ran, and nothing after it runs."""
    page = tmp_path / "page.md"
    page.write_text("""# probe

<!-- docs-test: file notes/hello.py -->
```python
import sys
print("hello from", sys.argv[1:])
```

```console
$ python notes/hello.py a b
hello from ['a', 'b']
$ preftune prefs rank --rewards y1=1,y2=0 --json
...
  "probability": 0.7310585786300049,
```

```python
import sys
print("about to fail", file=sys.stderr)
sys.exit(3)
```

```bash
touch never-made
```
""", encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    outcome = run_page(page, work, warm=warm)
    assert len(outcome.ran) == 2 and len(outcome.failures) == 1, outcome
    failure = outcome.failures[0]
    assert failure.startswith(f"{page}:17 (python): python exited with status 3"), failure
    assert "about to fail" in failure
    assert not (work / "never-made").exists()

    page.write_text("```console\n$ preftune prefs rank --rewards y1=1,y2=0\nP(y1 > y2) = 0.5\n```\n")
    outcome = run_page(page, tmp_path / "work2", warm=warm)
    assert outcome.failures and "did not print the line shown on the page:\n  P(y1 > y2) = 0.5" in outcome.failures[0]


def test_console_output_matching() -> None:
    """Shown lines must appear in order; whitespace and wrapping do not matter; ``...`` is any text."""
    steps = console_steps("$ a \\\n    --b\nout 1\n...\n$ c\n")
    assert steps == [("a  --b", ["out 1", "..."]), ("c", [])]
    actual = "┃ beta ┃  loss ┃\n│ 0.5  │ 0.62  │\nwrapped across\n  two lines\nend\n"
    assert missing_output(["┃ beta ┃ loss ┃", "...", "wrapped across two lines"], actual) is None
    assert missing_output(["│ 0.5 │ 0.6...│", "(a comment)", "end"], actual) is None
    assert missing_output(["end", "│ 0.5 │"], actual) == "│ 0.5 │"          # out of order
    assert missing_output(["│ 0.5 │ 0.63 │"], actual) == "│ 0.5 │ 0.63 │"


# ------------------------------------------------------------------------------------- the demo's claims


def _default_stages() -> list[str]:
    from preftune.experiments.demo.pipeline import Demo
    from preftune.experiments.demo.settings import DEFAULT

    return [name for name, _ in Demo("unused", DEFAULT, cache_dir="unused").stages]


def test_demo_help_names_every_stage_and_method() -> None:
    from typer.testing import CliRunner

    from preftune.cli import app
    from preftune.experiments.demo.settings import DEFAULT

    result = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    until = re.search(r"Stop after this stage: (.*?)\.", text)
    assert until, text
    assert re.findall(r"[a-z]+", until.group(1).replace(" or ", ", ")) == _default_stages()
    for method in DEFAULT.methods:
        assert method.upper() in text, f"`demo --help` does not mention {method.upper()}"


def test_demo_md_stage_table_lists_the_stages_the_run_prints() -> None:
    """docs/demo.md's table numbers the stages as the run prints them, `demo [N/11] NAME`."""
    text = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8")
    section = text.split("## The stages", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ([a-z]+) \|", section, flags=re.M)
    stages = _default_stages()
    assert [int(n) for n, _ in rows] == list(range(1, len(stages) + 1))
    assert [name for _, name in rows] == stages
    assert f"demo [N/{len(stages)}]" in section


def test_report_reproduce_line_reruns_the_same_preset() -> None:
    """The report's first "Reproduce" command is the command that made the run (so it skips every
    finished stage instead of refusing a directory with other settings)."""
    import dataclasses

    from preftune.experiments.demo.report import _commands
    from preftune.experiments.demo.settings import DEFAULT, QUICK

    def first(settings):
        return _commands(SimpleNamespace(out=Path("/tmp/q"), settings=settings)).splitlines()[0]

    assert first(QUICK).startswith("preftune demo --output /tmp/q --quick ")
    assert first(DEFAULT).startswith("preftune demo --output /tmp/q ")
    assert "--quick" not in first(DEFAULT)
    custom = first(dataclasses.replace(QUICK, dpo_beta=0.5))
    assert custom.startswith("#") and "Demo(" in custom
