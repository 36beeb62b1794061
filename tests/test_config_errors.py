"""A corpus of bad `preftune train` inputs: each one exits non-zero with one line naming the key (plus a
hint), no traceback, and before anything loads.

Each case runs the real command through typer's runner with the training loop replaced by a function
that fails the test if it is reached: the loop is where models load (``TrainingMethod.setup``), so a case
that gets there would have been found too late, or accepted silently. Positive controls at the end show
that the same commands with good values do reach the loop, so the corpus does not pass by refusing
everything. Part of the bad-input corpus of issue 11 (every case: 0 tracebacks, 0 silent acceptances).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app

REPO = Path(__file__).resolve().parents[1]
PREFS = str(REPO / "examples/data/prefs.jsonl")
SFT_DATA = str(REPO / "examples/data/sft.jsonl")
PROMPTS = str(REPO / "examples/data/prompts.txt")
REWARD_FN = f"{REPO / 'examples/rewards.py'}:letters"

# the keys each method needs, all valid; a case adds its bad part after them (later keys win)
BASE = {
    "sft": ["--model", "gpt2", "--data", SFT_DATA],
    "reward": ["--model", "gpt2", "--data", PREFS],
    "dpo": ["--model", "gpt2", "--data", PREFS],
    "ppo": ["--model", "gpt2", "--data", PROMPTS, "--reward", REWARD_FN],
    "rloo": ["--model", "gpt2", "--data", PROMPTS, "--reward", REWARD_FN],
    "raft": ["--model", "gpt2", "--data", PROMPTS, "--reward", REWARD_FN],
}

# (method, extra arguments, the key the error must name, a piece of the message or hint)
CASES = [
    # ranges of the keys every method shares
    ("sft", ["--learning_rate", "0"], "learning_rate", "must be > 0"),
    ("sft", ["--learning_rate", "-1e-5"], "learning_rate", "must be > 0"),
    ("dpo", ["--batch_size", "0"], "batch_size", "must be >= 1"),
    ("dpo", ["--grad_accum", "0"], "grad_accum", "must be >= 1"),
    ("sft", ["--eval_batch_size", "0"], "eval_batch_size", "must be >= 1"),
    ("sft", ["--max_steps", "0"], "max_steps", "must be >= 1"),
    ("sft", ["--epochs", "0"], "epochs", "must be > 0"),
    ("sft", ["--max_length", "1"], "max_length", "must be >= 2"),
    ("sft", ["--seed", "-1"], "seed", "must be in [0, 4294967296)"),
    ("sft", ["--warmup_steps", "-5"], "warmup_steps", "must be >= 0"),
    ("sft", ["--warmup_ratio", "1.5"], "warmup_ratio", "must be in [0, 1]"),
    ("sft", ["--weight_decay", "-0.1"], "weight_decay", "must be >= 0"),
    ("dpo", ["--adam_beta1", "1.5"], "adam_beta1", "must be in [0, 1) (got 1.5)"),
    ("dpo", ["--adam_beta2", "1"], "adam_beta2", "must be in [0, 1)"),
    ("dpo", ["--adam_epsilon", "0"], "adam_epsilon", "must be > 0"),
    ("sft", ["--max_grad_norm", "-1"], "max_grad_norm", "must be >= 0"),
    ("sft", ["--log_every", "0"], "log_every", "must be >= 1"),
    ("sft", ["--eval_every", "-1"], "eval_every", "must be >= 0"),
    ("sft", ["--save_every", "-1"], "save_every", "must be >= 0"),
    ("sft", ["--keep_checkpoints", "-1"], "keep_checkpoints", "must be >= 0"),
    ("sft", ["--eval_fraction", "1.0"], "eval_fraction", "must be in [0, 1)"),
    ("sft", ["--eval_fraction", "0.1", "--eval_data", SFT_DATA], "eval_fraction", "together with eval_data"),
    # types and choices
    ("sft", ["--batch_size", "eight"], "batch_size", "must be an integer"),
    ("sft", ["--batch_size", "2.5"], "batch_size", "must be an integer"),
    ("sft", ["--learning_rate", "fast"], "learning_rate", "must be a number"),
    ("sft", ["--learning_rate", "nan"], "learning_rate", "must be a number"),
    ("sft", ["--merge_lora", "maybe"], "merge_lora", "must be true or false"),
    ("sft", ["--dtype", "bf16"], "dtype", "did you mean 'bfloat16'"),
    ("sft", ["--lr_scheduler", "cosin"], "lr_scheduler", "did you mean 'cosine'"),
    ("sft", ["--report_to", "wandbb"], "report_to", "did you mean 'wandb'"),
    ("sft", ["--data_format", "sft_message"], "data_format", "did you mean 'sft_messages'"),
    ("dpo", ["--truncation", "cut"], "truncation", "is not one of keep_end, error, drop"),
    ("dpo", ["--max_prompt_length", "2000"], "max_prompt_length", "must be < max_length (1024)"),
    ("dpo", ["--max_prompt_length", "0"], "max_prompt_length", "must be >= 1"),
    # the DPO family's hyperparameters
    ("dpo", ["--beta", "0"], "beta", "must be > 0"),
    ("dpo", ["--beta", "-0.1"], "beta", "reverses it"),
    ("dpo", ["--loss", "ipo", "--beta", "0"], "beta", "must be > 0"),
    ("dpo", ["--loss", "cdpo", "--label_smoothing", "0.7"], "label_smoothing", "above it they reverse it"),
    ("dpo", ["--loss", "cdpo", "--label_smoothing", "0.5"], "label_smoothing", "must be in [0, 0.5)"),
    ("dpo", ["--loss", "robust", "--label_smoothing", "-0.1"], "label_smoothing", "must be in [0, 0.5)"),
    ("dpo", ["--loss", "simpo", "--gamma", "-1"], "gamma", "must be >= 0"),
    ("dpo", ["--loss", "unlikelihood", "--alpha", "-1"], "alpha", "must be >= 0"),
    ("dpo", ["--loss", "ipo", "--loss_kwargs", "{beta: 0}"], "loss_kwargs.beta", "must be > 0"),
    ("dpo", ["--loss", "cdpo", "--loss_kwargs", "{label_smoothing: 0.9}"], "loss_kwargs.label_smoothing",
     "must be in [0, 0.5)"),
    ("dpo", ["--loss", "ipo", "--loss_kwargs", "{length_normalize: 3}"], "loss_kwargs.length_normalize",
     "must be true or false"),
    ("dpo", ["--loss", "orpo", "--loss_kwargs", "{beta: fast}"], "loss_kwargs.beta", "must be a number"),
    ("dpo", ["--gamma", "0.5"], "gamma", "loss 'dpo' has no hyperparameter 'gamma'"),
    ("dpo", ["--loss", "simpoo"], "loss", "did you mean 'simpo'"),
    ("dpo", ["--beta"], "beta", "--beta needs a value"),
    # LoRA
    ("sft", ["--lora.r", "0"], "lora.r", "must be an integer >= 1"),
    ("sft", ["--lora.r", "eight"], "lora.r", "must be an integer >= 1"),
    ("sft", ["--lora.lora_alpha", "-8"], "lora.lora_alpha", "must be a number > 0"),
    ("sft", ["--lora.lora_dropout", "1.5"], "lora.lora_dropout", "must be a number in [0, 1)"),
    ("sft", ["--lora.rank", "8"], "lora.rank", "did you mean 'r'"),
    ("sft", ["--lora", "{}"], "lora", "is an empty mapping"),
    ("sft", ["--lora", "true"], "lora", "must be a mapping"),
    ("sft", ["--merge_lora"], "merge_lora", "needs `lora` to be set"),
    # the online methods
    ("ppo", ["--kl_coef", "-0.1"], "kl_coef", "must be >= 0"),
    ("raft", ["--kl_coef", "-1"], "kl_coef", "must be >= 0"),
    ("ppo", ["--temperature", "0"], "temperature", "greedy decoding"),
    ("ppo", ["--top_p", "0"], "top_p", "must be in (0, 1]"),
    ("ppo", ["--top_k", "-1"], "top_k", "must be >= 0"),
    ("ppo", ["--gamma", "1.5"], "gamma", "must be in [0, 1]"),
    ("ppo", ["--lam", "-0.1"], "lam", "must be in [0, 1]"),
    ("ppo", ["--vf_coef", "0"], "vf_coef", "never trained"),
    ("ppo", ["--clip_range", "0"], "clip_range", "must be > 0"),
    ("ppo", ["--value_clip_range", "-0.2"], "value_clip_range", "must be > 0"),
    ("ppo", ["--max_new_tokens", "600"], "max_new_tokens", "< max_length (512): the prompt needs tokens"),
    ("ppo", ["--kl_target", "0"], "kl_target", "must be > 0"),
    ("ppo", ["--kl_target", "4", "--kl_coef", "0"], "kl_target", "needs a kl_coef > 0"),
    ("ppo", ["--kl_horizon", "0"], "kl_horizon", "must be > 0"),
    ("ppo", ["--missing_eos_penalty", "-1"], "missing_eos_penalty", "never end"),
    ("ppo", ["--ptx_coef", "0.5"], "ptx_coef", "needs ptx_data"),
    ("ppo", ["--update_epochs", "0"], "update_epochs", "must be >= 1"),
    ("ppo", ["--num_mini_batches", "0"], "num_mini_batches", "must be >= 1"),
    ("ppo", ["--sample_rows", "0"], "sample_rows", "must be >= 1"),
    ("ppo", ["--generation_batch_size", "0"], "generation_batch_size", "must be >= 1"),
    ("ppo", ["--kl_estimator", "k2"], "kl_estimator", "is not one of k1, k3"),
    ("ppo", ["--template", "plain"], "template", "must be raw, chat, tldr or contain {prompt}"),
    ("ppo", ["--eval_fraction", "0.1"], "eval_fraction", "not used by online methods"),
    ("rloo", ["--num_samples", "1"], "num_samples", "leave-one-out"),
    ("rloo", ["--baseline", "loo"], "baseline", "is not one of leave_one_out, mean, none"),
    ("raft", ["--top_fraction", "0"], "top_fraction", "must be in (0, 1]"),
    ("raft", ["--num_samples", "1"], "num_samples", "best of K"),
    ("reward", ["--center_rewards_coefficient", "-1"], "center_rewards_coefficient", "must be >= 0"),
    ("reward", ["--rankings", "split"], "rankings", "is not one of keep, pairs"),
    # required keys, and what the keys point at (checked before anything loads)
    ("dpo", ["--model", ""], "model", "is required"),
    ("sft", ["--data", ""], "data", "is required"),
    ("ppo", ["--data", ""], "data", "is required"),
    ("rloo", ["--reward", ""], "reward", "is required"),
    ("dpo", ["--model", "./runs/x"], "model", "no such directory: './runs/x'"),
    ("dpo", ["--model", "/nonexistent/preftune/model"], "model", "no such directory"),
    ("dpo", ["--ref_model", "runs/sft/final"], "ref_model", "no such directory: 'runs/sft/final'"),
    ("dpo", ["--ref_model", "~/preftune-no-such-model"], "ref_model", "no such directory"),
    ("reward", ["--model", "../no/such/sft/final"], "model", "no such directory"),
    ("ppo", ["--reward", "./runs/reward/final"], "reward", "no such directory"),
    ("ppo", ["--reward", "no_such_file.py:score"], "reward", "no such file: 'no_such_file.py'"),
    ("ppo", ["--value_model", "runs/value/x/final"], "value_model", "no such directory"),
    ("ppo", ["--ref_model", "/no/ref"], "ref_model", "no such directory"),
    ("ppo", ["--data", "prompts-missing.txt"], "data", "no such file or directory"),
    ("rloo", ["--data", "prompts"], "data", "no such file or directory"),  # online prompts are always a file
    ("sft", ["--data", "./missing.jsonl"], "data", "no such file or directory"),
    ("dpo", ["--eval_data", "held_out.jsonl"], "eval_data", "no such file or directory"),
    ("ppo", ["--ptx_data", "sft_rows.jsonl", "--ptx_coef", "0.1"], "ptx_data", "no such file or directory"),
    # names from other tools (TRL) point at preftune's key
    ("sft", ["--dataset_name", "x"], "dataset_name", "did you mean --data?"),
    ("dpo", ["--model_name_or_path", "gpt2"], "model_name_or_path", "did you mean --model?"),
    ("dpo", ["--per_device_train_batch_size", "4"], "per_device_train_batch_size", "did you mean --batch_size?"),
    ("sft", ["--learning-rate-typo", "1"], "learning_rate_typo", "did you mean --learning_rate?"),
    ("sft", ["--num_train_epochs", "3"], "num_train_epochs", "did you mean --epochs?"),
    ("sft", ["--gradient_accumulation_steps", "4"], "gradient_accumulation_steps", "did you mean --grad_accum?"),
    ("sft", ["--logging_steps", "5"], "logging_steps", "did you mean --log_every?"),
    ("sft", ["--save_steps", "5"], "save_steps", "did you mean --save_every?"),
    ("sft", ["--max_prompt_length", "64"], "max_prompt_length", "did you mean --max_length?"),
    ("dpo", ["--max_completion_length", "64"], "max_completion_length", "did you mean --max_length?"),
    ("ppo", ["--max_completion_length", "64"], "max_completion_length", "did you mean --max_new_tokens?"),
    ("dpo", ["--loss_type", "ipo"], "loss_type", "did you mean --loss?"),
    ("sft", ["--lora_r", "8"], "lora_r", "did you mean --lora.r?"),
    ("ppo", ["--beta", "0.1"], "beta", "did you mean --kl_coef?"),
    ("sft", ["--beta", "0.1"], "beta", "`preftune train keys sft` lists every key"),
    ("dpo", ["--output-dirr", "x"], "output_dirr", "did you mean --output_dir?"),
    # the command line itself
    ("dpo", ["--config"], "config", "--config needs a file"),
]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[object]:
    """Replace the training loop (where models load) with a recorder; run from an empty directory."""
    import preftune.train.loop

    reached: list[object] = []
    monkeypatch.setattr(preftune.train.loop, "train", lambda method, config: reached.append(config) or Path("x"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return reached


def _invoke(args: list[str]):
    return CliRunner().invoke(app, ["train", *args], env={"COLUMNS": "1000"})


def _assert_clear_error(result, field: str, fragment: str, reached: list[object]) -> None:
    out = result.output
    assert result.exit_code not in (0, None), out
    assert not reached, f"the run reached the training loop (a model would have loaded):\n{out}"
    assert "Traceback" not in out and (result.exception is None or isinstance(result.exception, SystemExit)), out
    assert f"field '{field}'" in out, out
    assert fragment in out, out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and len(lines) <= 2, out  # one line, and at most one hint line
    assert len(lines) == 1 or lines[1].strip().startswith("hint: "), out


@pytest.mark.parametrize(("method", "extra", "field", "fragment"), CASES,
                         ids=[f"{m}-{' '.join(a)[:40]}" for m, a, _, _ in CASES])
def test_bad_input_is_one_clear_line_before_anything_loads(no_training, method, extra, field, fragment) -> None:
    _assert_clear_error(_invoke([method, *BASE[method], *extra]), field, fragment, no_training)


def test_the_corpus_is_large_and_covers_every_method() -> None:
    assert len(CASES) >= 100
    assert {m for m, *_ in CASES} == set(BASE)


# ---------------------------------------------------------------------------------------------- config files
def _yaml(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "field", "fragment"), [
    (f"model: gpt2\ndata: {PREFS}\nbeta: 0\n", "beta", "c.yaml:3 field 'beta': must be > 0"),
    (f"model: gpt2\ndata: {PREFS}\nloss: cdpo\nlabel_smoothing: 0.7\n", "label_smoothing", "c.yaml:4"),
    (f"model: gpt2\ndata: {PREFS}\nlora:\n  r: 0\n", "lora.r", "c.yaml:4 field 'lora.r'"),
    (f"model: gpt2\ndata: {PREFS}\nbta: 0.1\n", "bta", "did you mean beta?"),
    (f"model: gpt2\ndata: {PREFS}\nmodel: gpt2\n", "model", "appears twice"),
    (f"model: gpt2\ndata: {PREFS}\nref_model: ./runs/sft/final\n", "ref_model", "c.yaml:3 field 'ref_model'"),
    (f"model: gpt2\ndata: {PREFS}\ndataset_name: x\n", "dataset_name", "did you mean data?"),
])
def test_bad_config_file_names_its_line(no_training, tmp_path: Path, text: str, field: str, fragment: str) -> None:
    path = _yaml(tmp_path, text)
    _assert_clear_error(_invoke(["dpo", str(path)]), field, fragment, no_training)


def test_unreadable_config_files(no_training, tmp_path: Path) -> None:
    """A missing file, a file that is no YAML and one that is no mapping: said without a traceback."""
    bad_yaml = _yaml(tmp_path, "model: [gpt2\n", "bad.yaml")
    a_list = _yaml(tmp_path, "- model\n- data\n", "list.yaml")
    for args, fragment in [([str(tmp_path / "none.yaml")], "config file not found"),
                           ([str(bad_yaml)], "not valid YAML"), ([str(a_list)], "must be a mapping"),
                           (["--model", "gpt2", "c.yaml"], "the config file goes first")]:
        result = _invoke(["dpo", *args])
        assert result.exit_code == 1 and not no_training and "Traceback" not in result.output, result.output
        assert fragment in result.output, result.output


def test_two_config_files_are_refused(no_training, tmp_path: Path) -> None:
    a, b = _yaml(tmp_path, "model: gpt2\n", "a.yaml"), _yaml(tmp_path, "model: gpt2\n", "b.yaml")
    _assert_clear_error(_invoke(["dpo", str(a), "--config", str(b)]), "config", "two config files", no_training)


def test_a_model_directory_that_is_a_run_directory(no_training, tmp_path: Path) -> None:
    """`--model runs/sft` (the run, not its model) is refused with the way to its final/ model."""
    (tmp_path / "runs" / "sft" / "final").mkdir(parents=True)
    (tmp_path / "runs" / "sft" / "final" / "config.json").write_text("{}")
    result = _invoke(["dpo", *BASE["dpo"], "--ref_model", "runs/sft"])
    _assert_clear_error(result, "ref_model", "did you mean runs/sft/final?", no_training)


def test_an_uncached_hub_model_offline_is_refused_before_loading(no_training, monkeypatch, tmp_path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = _invoke(["dpo", *BASE["dpo"], "--model", str(tmp_path), "--ref_model", "org/model"])
    # tmp_path is no model directory either: the first key that fails is named
    _assert_clear_error(result, "model", "not a model directory", no_training)
    (tmp_path / "config.json").write_text("{}")
    result = _invoke(["dpo", *BASE["dpo"], "--model", str(tmp_path), "--ref_model", "org/model"])
    _assert_clear_error(result, "ref_model", "not in the local Hugging Face cache", no_training)
    assert "hf download org/model" in result.output


# ---------------------------------------------------------------------------------------------- positive controls
def test_the_config_file_is_optional_and_good_values_reach_the_loop(no_training, tmp_path: Path) -> None:
    """`preftune train dpo --model M --data D` (no file, as TRL's CLI) and `--config FILE` both train."""
    result = _invoke(["dpo", *BASE["dpo"], "--loss", "cdpo", "--label_smoothing", "0.2", "--lora.r", "8"])
    assert result.exit_code == 0, result.output
    (config,) = no_training
    assert config.model == "gpt2" and config.loss_hparams() == {"label_smoothing": 0.2} and config.lora == {"r": 8}
    path = _yaml(tmp_path, f"model: gpt2\ndata: {PREFS}\nbeta: 0.3\n")
    assert _invoke(["dpo", "--config", str(path), "--batch_size", "2"]).exit_code == 0
    assert _invoke(["dpo", f"--config={path}"]).exit_code == 0
    assert [c.beta for c in no_training[1:]] == [0.3, 0.3] and no_training[1].batch_size == 2


def test_dashes_and_underscores_in_key_names(no_training) -> None:
    """--max-new-tokens and --max_new_tokens are the same key (and --key=value works for both)."""
    for spelling in (["--max-new-tokens", "16"], ["--max_new_tokens", "16"], ["--max-new-tokens=16"],
                     ["--max_new_tokens=16"]):
        result = _invoke(["ppo", *BASE["ppo"], *spelling])
        assert result.exit_code == 0, result.output
    assert [c.max_new_tokens for c in no_training] == [16, 16, 16, 16]


def test_no_arguments_shows_the_help() -> None:
    result = CliRunner().invoke(app, ["train", "dpo"], env={"COLUMNS": "200"})
    assert "Usage" in result.output and "--beta float > 0 | null" in result.output
    assert "<bool>" not in result.output and "--merge_lora [true|false]" in result.output
