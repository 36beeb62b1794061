"""Config system: YAML + command-line overrides, clear errors with suggestions, the resolved config file."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.config import (
    coerce,
    from_mapping,
    keys,
    load_config,
    parse_overrides,
    to_dict,
    write_config,
)
from preftune.errors import PreftuneError
from preftune.train import METHODS
from preftune.train.dpo import DPOConfig
from preftune.train.reward import RewardConfig
from preftune.train.sft import SFTConfig


def _yaml(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    """Defaults < YAML < overrides: the YAML sets beta 0.3 and lora r 4; --beta 0.2 and --lora.r 8 win,
    the YAML's lora target_modules survives the --lora.r override, and untouched keys keep defaults."""
    path = _yaml(tmp_path, """
        model: some/model
        data: pairs.jsonl
        learning_rate: 1e-6     # PyYAML reads this as the string "1e-6": still a float here
        beta: 0.3
        lora:
          r: 4
          target_modules: [q_proj, v_proj]
    """)
    config = load_config(DPOConfig, path, ["--beta", "0.2", "--lora.r", "8", "--max-steps=5", "--merge_lora"])
    assert config.beta == 0.2
    assert config.lora == {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    assert config.learning_rate == 1e-6 and isinstance(config.learning_rate, float)
    assert config.max_steps == 5 and config.merge_lora is True
    assert config.batch_size == DPOConfig().batch_size == 8
    assert config.loss_hparams() == {"beta": 0.2}


def test_unknown_key_names_line_and_suggests(tmp_path: Path) -> None:
    path = _yaml(tmp_path, """
        model: m
        data: d.jsonl
        bta: 0.1
    """)
    with pytest.raises(PreftuneError) as err:
        load_config(DPOConfig, path)
    text = str(err.value)
    assert f"{path}:3" in text and "'bta'" in text and "did you mean beta" in text


def test_unknown_override_suggests_alias_and_nearest() -> None:
    base = {"model": "m", "data": "d"}
    with pytest.raises(PreftuneError, match="did you mean --learning_rate"):
        load_config(SFTConfig, None, [*_flat(base), "--lr", "1e-4"])
    with pytest.raises(PreftuneError, match="did you mean --batch_size"):
        load_config(SFTConfig, None, [*_flat(base), "--batch_sise", "4"])


def _flat(values: dict[str, str]) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k}", v)]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("batch_size", "eight", "must be an integer"),
    ("batch_size", "2.5", "must be an integer"),
    ("learning_rate", "fast", "must be a number"),
    ("merge_lora", "maybe", "must be true or false"),
    ("lora", "[1, 2]", "must be a mapping"),
    ("dtype", "bf16", "did you mean 'bfloat16'"),
    ("batch_size", "0", "must be >= 1"),
])
def test_wrong_types_and_values_name_the_key(key: str, value: str, message: str) -> None:
    with pytest.raises(PreftuneError, match=message) as err:
        load_config(SFTConfig, None, ["--model", "m", "--data", "d", f"--{key}", value])
    assert f"field '{key}'" in str(err.value)


def test_wrong_type_in_yaml_points_at_the_line(tmp_path: Path) -> None:
    path = _yaml(tmp_path, """
        model: m
        data: d.jsonl
        grad_accum: [1, 2]
    """)
    with pytest.raises(PreftuneError, match="must be an integer") as err:
        load_config(SFTConfig, path)
    assert f"{path}:3 field 'grad_accum'" in str(err.value)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model: a\ndata: d\nmodel: b\n")
    with pytest.raises(PreftuneError, match="appears twice"):
        load_config(SFTConfig, path)


def test_required_keys_and_cross_key_checks() -> None:
    with pytest.raises(PreftuneError, match="field 'model'.*required"):
        from_mapping(SFTConfig, {"data": "d"})
    with pytest.raises(PreftuneError, match="eval_fraction.*together with eval_data"):
        from_mapping(SFTConfig, {"model": "m", "data": "d", "eval_data": "e", "eval_fraction": 0.1})
    with pytest.raises(PreftuneError, match="merge_lora.*needs `lora`"):
        from_mapping(SFTConfig, {"model": "m", "data": "d", "merge_lora": True})


def test_lora_keys_are_checked_against_peft() -> None:
    with pytest.raises(PreftuneError, match="unknown LoRA option 'rank'") as err:
        from_mapping(SFTConfig, {"model": "m", "data": "d", "lora": {"rank": 8}})
    assert "field 'lora.rank'" in str(err.value)
    assert from_mapping(SFTConfig, {"model": "m", "data": "d", "lora": {"r": 8}}).lora == {"r": 8}


def test_dpo_loss_hyperparameters() -> None:
    """Flat keys reach the loss only when set; a key the loss does not take is an error naming what it takes."""
    base = {"model": "m", "data": "d"}
    assert from_mapping(DPOConfig, base).loss_hparams() == {}  # every hyperparameter at the loss's default
    simpo = from_mapping(DPOConfig, {**base, "loss": "simpo", "beta": 2.5, "gamma": 1.0})
    assert simpo.loss_hparams() == {"beta": 2.5, "gamma": 1.0}
    cdpo = from_mapping(DPOConfig, {**base, "loss": "cdpo", "loss_kwargs": {"label_smoothing": 0.2}})
    assert cdpo.loss_hparams() == {"label_smoothing": 0.2}
    with pytest.raises(PreftuneError, match="loss 'dpo' has no hyperparameter 'gamma'"):
        from_mapping(DPOConfig, {**base, "gamma": 0.5})
    with pytest.raises(PreftuneError, match="did you mean 'simpo'"):
        from_mapping(DPOConfig, {**base, "loss": "simpoo"})


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    """write_config writes commented YAML that loads back into an equal config."""
    config = from_mapping(RewardConfig, {"model": "m", "data": "d", "lora": {"r": 4}, "eval_data": None,
                                         "learning_rate": 3e-5, "max_prompt_length": 64})
    path = write_config(config, tmp_path / "out" / "config.yaml")
    text = path.read_text()
    assert text.startswith("# preftune train reward: resolved config")
    assert "# peak learning rate of AdamW\nlearning_rate: 3.0e-05\n" in text
    assert to_dict(load_config(RewardConfig, path)) == to_dict(config)


def test_every_key_has_type_default_and_help() -> None:
    for cls in (spec.config for spec in METHODS.values()):
        infos = keys(cls)
        assert [i.name for i in infos] == [f.name for f in dataclasses.fields(cls)]
        for info in infos:
            assert info.help, info.name
            assert info.type.removesuffix(" | null") in ("bool", "int", "float", "str", "mapping", "list"), info.name


def test_parse_overrides_forms() -> None:
    assert parse_overrides(["--beta", "0.2", "--lora.r=8", "--merge-lora", "--eval_data", "null"]) == [
        ("beta", "0.2"), ("lora.r", "8"), ("merge_lora", "true"), ("eval_data", "null")]
    with pytest.raises(PreftuneError, match="unexpected argument 'stray'"):
        parse_overrides(["stray"])


def test_coerce_rules() -> None:
    assert coerce("1e-5", float, key="x", from_text=True) == 1e-5
    assert coerce(3, float, key="x", from_text=False) == 3.0
    assert coerce("4.0", int, key="x", from_text=True) == 4
    assert coerce("null", int | None, key="x", from_text=True) is None
    assert coerce("{r: 8}", dict | None, key="x", from_text=True) == {"r": 8}
    with pytest.raises(ValueError, match="must be true or false"):
        coerce(1, bool, key="x", from_text=False)
    with pytest.raises(ValueError, match="not null"):
        coerce(None, int, key="x", from_text=False)


def test_cli_help_lists_every_key() -> None:
    result = CliRunner().invoke(app, ["train", "dpo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for info in keys(DPOConfig):
        assert f"--{info.name} " in result.output


def test_cli_unknown_key_is_one_clear_line(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model: m\ndata: d.jsonl\n")
    result = CliRunner().invoke(app, ["train", "sft", str(path), "--bach_size", "4"])
    assert result.exit_code == 1
    assert "unknown key '--bach_size'" in result.output and "did you mean --batch_size" in result.output
    assert "Traceback" not in result.output


def test_cli_unknown_method_suggests() -> None:
    result = CliRunner().invoke(app, ["train", "dpoo", "x.yaml"])
    assert result.exit_code != 0 and "Did you mean 'dpo'" in result.output


def test_cli_keys_markdown() -> None:
    result = CliRunner().invoke(app, ["train", "keys", "sft", "--markdown"])
    assert result.exit_code == 0
    assert "| `completion_only_loss` | bool | `true` |" in result.output
    assert "| `learning_rate` | float > 0 | `2.0e-05` |" in result.output
    assert "| `eval_batch_size` | int >= 1 or null | `null` |" in result.output


# ---------------------------------------------------------------------------------------------- ranges
def test_ranges_are_declared_once_checked_and_shown() -> None:
    """opt(..., gt=/ge=/lt=/le=) is enforced by check_fields for any Config, shown by keys(), and null
    passes an optional key's range."""
    from dataclasses import dataclass

    from preftune.config import Config, Range, opt

    @dataclass
    class Toy(Config):
        rate: float = opt(0.1, "a rate", gt=0, le=1, why="it is a probability")
        count: int | None = opt(None, "a count", ge=1)

    assert [i.range for i in keys(Toy)] == ["in (0, 1]", ">= 1"]
    assert [i.type_label() for i in keys(Toy)] == ["float in (0, 1]", "int >= 1 | null"]
    assert from_mapping(Toy, {"rate": 1.0, "count": None}).rate == 1.0
    with pytest.raises(PreftuneError, match=r"field 'rate': must be in \(0, 1\] \(got 0.0\): it is a probability"):
        from_mapping(Toy, {"rate": 0})
    with pytest.raises(PreftuneError, match="field 'count': must be >= 1"):
        from_mapping(Toy, {"count": 0})
    assert str(Range(0, False, 1, True)) == "in [0, 1)" and str(Range(high=5)) == "<= 5"
    assert 0 in Range(0, False, 1, True) and 1 not in Range(0, False, 1, True)
    with pytest.raises(TypeError):
        opt(1, "both lower bounds", gt=0, ge=0)


def test_a_key_a_method_redefines_keeps_its_range() -> None:
    """A subclass that changes a key's default (learning_rate of sft, num_samples of rloo) must declare
    the same range again: the range lives in the field, and a forgotten one would switch the check off."""
    for spec in METHODS.values():
        ranges = {i.name: i.range for i in keys(spec.config)}
        for base in spec.config.__mro__[1:]:
            if dataclasses.is_dataclass(base):
                for info in keys(base):
                    assert ranges[info.name] == info.range, (spec.name, base.__name__, info.name)


def test_every_number_key_has_a_range() -> None:
    """Every int and float key of every method says which values it takes (seed included)."""
    for spec in METHODS.values():
        for info in keys(spec.config):
            if info.type.removesuffix(" | null") in ("int", "float"):
                assert info.range, (spec.name, info.name)


def test_cdpo_label_smoothing_above_half_is_refused() -> None:
    """label_smoothing is the probability eps that a label is flipped: above 0.5 cDPO learns the reverse
    preference, so training refuses it (the flat key and loss_kwargs alike) and says why."""
    base = {"model": "m", "data": "d", "loss": "cdpo"}
    assert from_mapping(DPOConfig, {**base, "label_smoothing": 0.49}).loss_hparams() == {"label_smoothing": 0.49}
    with pytest.raises(PreftuneError, match=r"field 'label_smoothing': must be in \[0, 0.5\) \(got 0.7\).*reverse"):
        from_mapping(DPOConfig, {**base, "label_smoothing": 0.7})
    with pytest.raises(PreftuneError, match="field 'loss_kwargs.label_smoothing'"):
        from_mapping(DPOConfig, {**base, "loss_kwargs": {"label_smoothing": 0.7}})


# ---------------------------------------------------------------------------------------------- other tools' names
@pytest.mark.parametrize(("cls", "name", "key"), [
    (SFTConfig, "dataset_name", "--data"), (SFTConfig, "model_name_or_path", "--model"),
    (SFTConfig, "per_device_train_batch_size", "--batch_size"), (SFTConfig, "num_train_epochs", "--epochs"),
    (SFTConfig, "gradient_accumulation_steps", "--grad_accum"), (SFTConfig, "logging_steps", "--log_every"),
    (SFTConfig, "save_steps", "--save_every"), (SFTConfig, "max_seq_length", "--max_length"),
    (SFTConfig, "lora_r", "--lora.r"), (SFTConfig, "lora_alpha", "--lora.lora_alpha"),
    (DPOConfig, "loss_type", "--loss"), (DPOConfig, "max_completion_length", "--max_length"),
    (DPOConfig, "ref_model_name_or_path", "--ref_model"), (DPOConfig, "per_device_eval_batch_size", "--eval_batch_size"),
])
def test_other_tools_names_point_at_the_key(cls: type, name: str, key: str) -> None:
    with pytest.raises(PreftuneError, match=f"did you mean {key}\\?") as err:
        load_config(cls, None, ["--model", "m", "--data", "d", f"--{name}", "1"])
    assert err.value.field == name.replace("-", "_")


def test_a_yaml_alias_of_a_mapping_field_shows_the_mapping(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model: m\ndata: d\nlora_r: 8\n")
    with pytest.raises(PreftuneError, match=r"(?s)c.yaml:3 field 'lora_r'.*did you mean lora: \{r: \.\.\.\}\?"):
        load_config(SFTConfig, path)


def test_online_names_point_at_the_online_keys() -> None:
    from preftune.train.ppo import PPOConfig

    for name, key in [("max_completion_length", "--max_new_tokens"), ("beta", "--kl_coef"),
                      ("num_ppo_epochs", "--update_epochs"), ("reward_model_path", "--reward")]:
        with pytest.raises(PreftuneError, match=f"did you mean {key}\\?"):
            load_config(PPOConfig, None, ["--model", "m", f"--{name}", "1"])


def test_a_bare_flag_is_true_only_for_bool_keys() -> None:
    """`--merge_lora` means true; `--beta` with no value is an error, not the string "true"."""
    assert load_config(SFTConfig, None, ["--model", "m", "--data", "d", "--lora.r", "8", "--merge_lora"]).merge_lora
    with pytest.raises(PreftuneError, match="--beta needs a value"):
        load_config(DPOConfig, None, ["--model", "m", "--data", "d", "--beta"])


def test_required_keys_say_how_to_give_them() -> None:
    with pytest.raises(PreftuneError, match="field 'model': is required") as err:
        load_config(DPOConfig, None, ["--data", "d"])
    assert "--model" in err.value.hint


def test_preflight_checks_paths_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation is about values: a config may name files that do not exist yet. preflight (called by
    `run` and the CLI before anything loads) then checks them, naming the key."""
    monkeypatch.chdir(tmp_path)
    config = from_mapping(DPOConfig, {"model": "m", "data": "d.jsonl", "ref_model": "runs/sft/final"})
    with pytest.raises(PreftuneError, match="field 'ref_model': no such directory"):
        config.preflight()
    (tmp_path / "d.jsonl").write_text("")
    config = from_mapping(DPOConfig, {"model": "m", "data": "d.jsonl"})
    config.preflight()  # a hub id and an existing file


def test_docs_key_tables_are_generated_from_the_registry() -> None:
    """Each key table of docs/training.md ("Every key") and docs/rlhf.md ("Keys") is, heading and rows,
    the table `preftune train keys --markdown` prints under that heading, and every table it prints is
    in one of them: a new key or method shows up as a failure here until the docs are regenerated."""
    import re

    from preftune.cli.train import markdown_sections

    generated = dict(markdown_sections())
    root = Path(__file__).resolve().parents[1] / "docs"
    found: dict[str, str] = {}
    for name in ("training.md", "rlhf.md"):
        for heading, table in re.findall(r"^### (.+?)\n\n((?:\|.*\n?)+)", (root / name).read_text(), flags=re.M):
            if heading in generated:
                found[heading] = table.rstrip("\n")
    assert found == generated
