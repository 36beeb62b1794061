"""The pure parts of benchmarks/vs_trl.py (preftune vs TRL): variant parsing, which runs are merged, the
configs both tools get, the padding and prompt shares, the step-time median and the data generators'
tokenisation property. Nothing here needs TRL installed or starts a process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def modules():
    """benchmarks/vs_trl.py and the vs_trl_data module it imports (sys.path and sys.modules restored after)."""
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "benchmarks" / "vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_trl"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module, sys.modules["vs_trl_data"]
    sys.path[:] = path
    for name in ("vs_trl", "vs_trl_data"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def vs(modules):
    return modules[0]


@pytest.fixture(scope="module")
def data(modules):
    return modules[1]


@pytest.fixture(scope="module")
def tokenizer():
    from preftune.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def corpus():
    from preftune.experiments.demo.corpus import load_corpus

    return load_corpus(("sonnets", "hamlet"))


def test_parse_variant_reads_yaml_scalars(vs):
    assert vs.parse_variant("nopack:packing=false,share_prompt=false") == (
        "nopack", {"packing": False, "share_prompt": False})
    assert vs.parse_variant("x: beta=0.2, mixed_precision=bf16") == ("x", {"beta": 0.2, "mixed_precision": "bf16"})
    for bad in ("nokeys", ":a=1", "v:a"):
        with pytest.raises(ValueError):
            vs.parse_variant(bad)


def test_plan_merges_runs_with_the_same_resolved_settings(vs):
    runs, pairs = vs.plan_runs(["defaults", "fp32", "bf16"], [("nopack", {"packing": False}),
                                                             ("b", {"mixed_precision": "bf16"})],
                               [("ckpt", {"activation_checkpointing": True})], preftune_mixed_precision="no")
    labels = [r.label for r in runs]
    # preftune's defaults are its fp32 run, TRL's defaults its bf16 run; "b" is preftune's bf16 run
    assert labels == ["preftune defaults = fp32", "TRL defaults = bf16", "TRL fp32", "preftune bf16 = b",
                      "preftune nopack", "TRL ckpt"]
    by_name = {name: (pt.label, trl.label) for name, pt, trl in pairs}
    assert by_name["defaults"] == ("preftune defaults = fp32", "TRL defaults = bf16")
    assert by_name["preftune nopack vs TRL fp32"] == ("preftune nopack", "TRL fp32")
    assert by_name["preftune b vs TRL bf16"] == ("preftune bf16 = b", "TRL defaults = bf16")
    assert by_name["preftune bf16 vs TRL ckpt"] == ("preftune bf16 = b", "TRL ckpt")
    # were preftune's default bf16, its defaults would be its bf16 run instead
    runs, _ = vs.plan_runs(["defaults", "fp32", "bf16"], [], [], preftune_mixed_precision="bf16")
    assert [r.label for r in runs] == ["preftune defaults = bf16", "TRL defaults = bf16", "preftune fp32", "TRL fp32"]


def test_both_configs_carry_the_same_settings_and_pass_variant_keys_through(vs):
    w = vs.WORKLOADS["short-chosen"]
    pt = vs.preftune_config(w, model="m", ref_model="r", data="d", output_dir="o", ref_cache_dir="c", seed=7,
                            keys={"packing": False, "mixed_precision": "bf16"})
    trl = vs.trl_config(w, seed=7, cpu=True, keys={"bf16": False})
    assert (pt["learning_rate"], pt["beta"], pt["batch_size"], pt["max_length"], pt["seed"]) == (
        trl["learning_rate"], trl["beta"], trl["per_device_train_batch_size"], trl["max_length"], trl["seed"])
    assert (pt["lr_scheduler"], pt["warmup_steps"], pt["weight_decay"], pt["max_grad_norm"]) == (
        trl["lr_scheduler_type"], trl["warmup_steps"], trl["weight_decay"], trl["max_grad_norm"])
    assert (pt["epochs"], pt["log_every"], pt["save_every"], pt["eval_every"]) == (1, 1, 0, 0)
    assert (trl["num_train_epochs"], trl["logging_steps"], trl["save_strategy"], trl["eval_strategy"]) == (
        1, 1, "no", "no")
    assert pt["loss"] == "dpo" and trl["loss_type"] == ["sigmoid"]
    assert pt["packing"] is False and pt["mixed_precision"] == "bf16" and trl["bf16"] is False
    assert trl["use_cpu"] and trl["train_sampling_strategy"] == "sequential" and trl["dataloader_drop_last"]
    assert trl["activation_checkpointing"] is False


def test_token_shares_by_hand(data):
    # 4 pairs (prompt, chosen, rejected), batch 2 in the order 0, 1, 2, 3:
    # step 1: longest row 2 + 6 = 8 -> 4 rows x 8 = 32 positions; real 2*2+1+6 + 2*3+2+2 = 21; prompt 4 + 6 = 10
    # step 2: longest 1 + 4 = 5 -> 20 positions; real 2+4+1 + 2+2+2 = 13; prompt 2 + 2 = 4
    shares = data.token_shares([(2, 1, 6), (3, 2, 2), (1, 4, 1), (1, 2, 2)], [0, 1, 2, 3], 2)
    assert shares["real_tokens"] == 34 and shares["padded_positions"] == 52 and shares["steps"] == 2
    assert shares["real_share"] == pytest.approx(34 / 52)
    assert shares["prompt_share"] == pytest.approx(14 / 34)


def test_step_ms_skips_the_first_two_steps(vs):
    # step ends at 1, 2, 4, 7, 11 s: steps 3, 4, 5 took 2, 3, 4 s -> median 3 s
    assert vs.step_ms([1.0, 2.0, 4.0, 7.0, 11.0]) == pytest.approx(3000)
    assert vs.step_ms([1.0, 2.5]) == pytest.approx(1500)  # too few steps: what there is
    assert vs.step_ms([1.0]) is None


def test_cut_to_tokens_keeps_whole_words(data):
    words = len  # a "tokenizer" that counts characters
    assert data.cut_to_tokens("to be or not to be", 9, words) == "to be or"
    assert data.cut_to_tokens("short", 9, words) == "short"


def test_hh_pairs_are_conversations_with_a_prompt_about_the_ratio(data):
    texts = [f"speech {i} " + "word " * (3 + i % 5) for i in range(60)]

    def count(text):
        return len(text.split())

    rows = data.hh_pairs(texts, 20, count=count, seed=0, response_tokens=(4, 6), prompt_ratio=4.0, prompt_max=40)
    assert len(rows) == 20
    for row in rows:
        assert row["prompt"].startswith("\n\nHuman: ") and row["prompt"].endswith("\n\nAssistant:")
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
        assert count(row["prompt"]) <= 40
        # the target reached, or stopped by prompt_max (a turn here is at most 12 words, 2 turns at a time)
        assert count(row["prompt"]) >= 4 * count(row["chosen"]) or count(row["prompt"]) > 40 - 2 * 12


def test_the_generated_data_tokenises_the_same_apart_and_together(data, tokenizer, corpus):
    """preftune tokenises prompt and response apart, TRL together (split where the ids diverge): the data
    of every workload is made so that both agree, which the harness checks again on the real tokenizer."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    sets = {"short-chosen": data.short_chosen_pairs(corpus, 24, seed=0),
            "hh": data.hh_pairs(data.speeches(corpus), 12, count=count, seed=0, response_tokens=(10, 30),
                              prompt_ratio=4.0, prompt_max=200),
            "demo": data.demo_pairs(corpus, 24, count=count, seed=0)}
    for name, rows in sets.items():
        check = data.check_tokenisation(tokenizer, rows)
        assert check["pairs_that_differ"] == 0, name
        assert check["preftune"] == check["trl_emulated"], name
    for row in sets["short-chosen"]:
        assert row["prompt"].endswith("\n") and not row["prompt"][-2].isspace()
        assert row["rejected"].count("\n") >= 2 and "\n" not in row["chosen"]


def test_the_tokenisation_check_catches_a_merge_across_the_boundary(data, tokenizer):
    # a prompt ending with a space: apart, " " is its own token; together it joins the response's first word
    check = data.check_tokenisation(tokenizer, [{"prompt": "Say ", "chosen": "hi", "rejected": "no"}])
    assert check["pairs_that_differ"] == 1
