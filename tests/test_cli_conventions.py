"""Conventions every command shares: both option spellings, help without `<bool>`, commands in the order of
the flow of work, and output without library progress bars or blank lines when it is not a terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from typer.testing import CliRunner

from preftune.cli import FLOW, app

runner = CliRunner()


def _commands(cmd: Any, ctx: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """(path, command, its context) for every command and group under ``cmd``; each context has its parent's,
    as when the command runs (the root's holds the app's context_settings)."""
    yield path, cmd, ctx
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            yield from _commands(sub, sub.context_class(sub, parent=ctx, info_name=name, **sub.context_settings),
                                 (*path, name))


def _all() -> list[tuple[tuple[str, ...], Any, Any]]:
    root = typer.main.get_command(app)
    return list(_commands(root, root.context_class(root, info_name="preftune", **root.context_settings)))


def test_every_option_takes_underscores_as_well_as_dashes():
    """For every option of every command (the `prefs loss` registry and every `train` method included),
    ``--max_new_tokens`` reaches the option declared as ``--max-new-tokens``."""
    checked = 0
    for path, cmd, ctx in _all():
        parser = cmd.make_parser(ctx)
        for param in cmd.params:
            for name in [*param.opts, *getattr(param, "secondary_opts", [])]:
                if not name.startswith("--") or "-" not in name[2:]:
                    continue
                underscored = "--" + name[2:].replace("-", "_")
                args = [underscored] if getattr(param, "is_flag", False) else [underscored, "1"]
                opts, _, _ = parser.parse_args(args)
                assert param.name in opts, (path, underscored)
                checked += 1
    assert checked > 50


def test_train_overrides_pass_through_as_typed(tmp_path: Path):
    """An unknown option is a `train` config override; it reaches the config engine as typed (here an
    unknown key, so the engine names it)."""
    config = tmp_path / "c.yaml"
    config.write_text("model: m\ndata: d\n")
    result = runner.invoke(app, ["train", "sft", str(config), "--bach_size", "4"])
    assert result.exit_code == 1
    assert "bach_size" in result.output and "batch_size" in result.output


def test_help_shows_no_bool_type_for_flags():
    """`--json  Print ...`, not `--json <bool>  Print ...`: in every command's help, the root's included."""
    for path, _cmd, _ctx in _all():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, path
    # a typed option still shows its type
    assert "<int>" in runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output


def test_top_level_help_lists_commands_in_the_order_of_the_flow():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    names = re.findall(r"^│ (\w+) ", result.output, flags=re.MULTILINE)
    assert names == list(FLOW)
    assert FLOW.index("train") < FLOW.index("generate") < FLOW.index("annotate") < FLOW.index("compare")


def test_commands_print_no_library_progress_bars_or_blank_lines(tiny_model_dir: Path, tmp_path: Path):
    """A fresh process whose output is a pipe, not a terminal: `train sft` loads and saves the tiny model,
    `generate` loads it again and samples. transformers' "Loading weights" / "Writing model shards" bars and
    the blank line a progress bar left behind were in every such log; now only preftune's own lines are."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f" A{i}."}) + "\n" for i in range(4)))
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data}\noutput_dir: {tmp_path / 'run'}\nreport_to: none\n"
                      "batch_size: 2\nmax_steps: 1\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\n")
    script = (
        "import sys\n"
        "from preftune.cli import app\n"
        "for args in (['train', 'sft', sys.argv[1]],\n"
        "             ['generate', '-m', sys.argv[2], '-p', sys.argv[3], '-o', sys.argv[4], '-n', '1',\n"
        "              '--max-new-tokens', '3']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DATASETS_"))}
    done = subprocess.run([sys.executable, "-c", script, str(config), str(tmp_path / "run" / "final"), str(prompts),
                           str(tmp_path / "gen.jsonl")], capture_output=True, text=True, env=env, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Loading weights" not in output and "Writing model shards" not in output, output
    assert "\r" not in output, output
    assert "" not in done.stdout.splitlines(), output  # no blank line where a progress bar would be
    assert "1 prompt from" in done.stdout and "1 completion each" in done.stdout
    assert "wrote 1 completion to" in done.stdout
