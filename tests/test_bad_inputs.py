"""A corpus of bad inputs, each run through the CLI: a clear one-line error (and a hint), never a traceback.

Every case runs `preftune ...` through typer's runner and checks the exit status (1: a PreftuneError, printed
as ``error: FILE:LINE field 'F': message`` and at most one ``hint:`` line; 2: a usage error of the command
line; 0: an input that is accepted, with its documented behaviour), that no exception other than the exit
escaped, and that the output names the file, line and field where the problem is.

The generate and score cases name a model directory that does not exist: each error must come from the
checks that run before a model loads (loading the model would fail with another message).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app

runner = CliRunner()
NO_MODEL = "{d}/no-such-model"  # never loaded: every generate / score case fails (or is checked) before that

STD = '{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n'
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads before the fix
DEEP_OBJECT = '{"a": ' * 50_000 + "1" + "}" * 50_000
HUGE_INT = "1" + "0" * 5000  # over Python's 4,300-digit limit for int(str): ValueError before the fix
PROMPTS = "To be, or not to be\nShall I compare thee\n"
GENS = "".join(json.dumps({"prompt_id": i, "prompt": f"p{i}", "completion_id": "A", "completion": f"c{i}"}) + "\n"
               for i in (1, 2))
OTHER_GENS = GENS.replace('"p1"', '"q1"').replace('"p2"', '"q2"')
JUDGE = "def score(prompt, completion):\n    return float(len(completion))\n"


@dataclass
class Case:
    id: str
    args: list[str]                                  # "{d}" is the case's directory
    files: dict[str, str | bytes] = field(default_factory=dict)  # name -> content; a name ending in / is a dir
    code: int = 1                                    # 1: PreftuneError, 2: usage error, 0: accepted
    expect: tuple[str, ...] = ()                     # substrings of the output ("{d}" replaced)
    xfail: str = ""                                  # a known bug outside this change's area: the reason


def gen(*args: str, prompts: str = "{d}/prompts.txt") -> list[str]:
    return ["generate", "--model", NO_MODEL, "--prompts", prompts, "--output", "{d}/out.jsonl", *args]


def score(data: str, *args: str) -> list[str]:
    return ["score", "--model", NO_MODEL, "--data", data, "--output", "{d}/scores.jsonl", *args]


def dpo(*args: str, **probs: str) -> list[str]:
    values = {"policy-chosen": "0.5", "policy-rejected": "0.2", "ref-chosen": "0.4", "ref-rejected": "0.3"}
    values.update({k.replace("_", "-"): v for k, v in probs.items()})
    return ["prefs", "loss", "dpo", *[x for k, v in values.items() for x in (f"--{k}", v)], *args]


def compare(*files: str) -> list[str]:
    return ["compare", *files, "--judge", "function:{d}/judge.py:score", "--output", "{d}/cmp", "--n-bootstrap", "0"]


RATINGS = "group,y1,y2\ng1,1,2\n"

CASES = [
    # ---------------------------------------------------------------- data inspect: JSONL, JSON, CSV, Parquet
    Case("data-malformed-json", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": STD + '{"prompt": "x",\n'},
         expect=("a.jsonl:2", "malformed JSON")),
    Case("data-line-is-a-list", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": "[1, 2]\n"},
         expect=("a.jsonl:1", "expected a JSON object, got list")),
    Case("data-line-is-a-string", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": STD + '"text"\n'},
         expect=("a.jsonl:2", "expected a JSON object, got str")),
    Case("data-empty-file", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": ""}, expect=("a.jsonl", "no records")),
    Case("data-blank-lines-only", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": "\n  \n\n"},
         expect=("a.jsonl", "no records")),
    Case("data-bom-is-accepted", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": "\ufeff" + STD}, code=0,
         expect=("standard", "1 read")),
    Case("data-crlf-is-accepted", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": STD.replace("\n", "\r\n") * 2},
         code=0, expect=("2 read",)),
    Case("data-line-separator-in-a-string-is-accepted", ["data", "inspect", "{d}/a.jsonl"],
         {"a.jsonl": STD.replace("2+2?", "two\u2028plus\u0085two")}, code=0, expect=("1 read",)),
    Case("data-not-utf8", ["data", "inspect", "{d}/a.jsonl"],
         {"a.jsonl": STD.encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'},
         expect=("a.jsonl:2", "not UTF-8", "0xe9", "column 16")),
    Case("data-latin1-json-file", ["data", "inspect", "{d}/a.json"],
         {"a.json": b'[{"prompt": "\xff", "chosen": "a", "rejected": "b"}]'}, expect=("a.json:1", "not UTF-8")),
    Case("data-deep-nesting-jsonl", ["data", "inspect", "{d}/a.jsonl"],
         {"a.jsonl": STD + '{"prompt": "p", "chosen": "a", "rejected": "b", "meta": ' + DEEP + "}\n"},
         expect=("a.jsonl:2", "nested 100,001 levels deep")),
    Case("data-deep-nesting-json", ["data", "inspect", "{d}/a.json"], {"a.json": "[\n" + DEEP + "\n]"},
         expect=("a.json:2", "nested 100,001 levels deep")),
    Case("data-deep-object-nesting", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": DEEP_OBJECT + "\n"},
         expect=("a.jsonl:1", "nested 50,000 levels deep")),
    Case("data-deep-nesting-csv-cell", ["data", "inspect", "{d}/a.csv"],
         {"a.csv": f'prompt,responses,ranking\np,"{DEEP[:3000] + DEEP[-3000:]}","[0, 1]"\n'},
         expect=("a.csv:2", "field 'responses'", "nested too deeply")),
    Case("data-integer-too-long", ["data", "inspect", "{d}/a.jsonl"],
         {"a.jsonl": STD[:-2] + f', "margin": {HUGE_INT}}}\n'}, expect=("a.jsonl:1", "4300 digits")),
    Case("data-chosen-equals-rejected-is-reported", ["data", "inspect", "{d}/a.jsonl"],
         {"a.jsonl": STD.replace('"5"', '"4"')}, code=0, expect=("a.jsonl:1", "chosen_equals_rejected")),
    Case("data-empty-chosen", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": STD.replace('"4"', '""')},
         expect=("a.jsonl:1", "field 'chosen'", "empty text", "--drop-invalid")),
    Case("data-empty-chosen-dropped", ["data", "inspect", "{d}/a.jsonl", "--drop-invalid"],
         {"a.jsonl": STD + STD.replace('"4"', '"  "')}, code=0, expect=("2 read", "1 dropped")),
    Case("data-chosen-is-a-number", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": STD.replace('"4"', "4")},
         expect=("a.jsonl:1", "field 'chosen'", "expected a string, got int")),
    Case("data-rejected-missing", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": '{"prompt": "p", "chosen": "a"}\n'},
         expect=("a.jsonl:1", "cannot tell the data format", "chosen, prompt")),
    Case("data-format-changes-midway", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": STD + '{"text": "t"}\n'},
         expect=("a.jsonl:2", "field 'prompt'", "missing field 'prompt'")),
    Case("data-forced-format-missing-field", ["data", "inspect", "{d}/a.jsonl", "--format", "ranking"],
         {"a.jsonl": STD}, expect=("a.jsonl:1", "field 'responses'")),
    Case("data-unknown-format", ["data", "inspect", "{d}/a.jsonl", "--format", "nope"], {"a.jsonl": STD},
         expect=("field 'format'", "unknown format 'nope'")),
    Case("data-missing-file", ["data", "inspect", "{d}/nope.jsonl"], expect=("nope.jsonl", "no such file")),
    Case("data-unsupported-suffix", ["data", "inspect", "{d}/a.txt"], {"a.txt": "hello\n"},
         expect=("a.txt", "unsupported file type '.txt'")),
    Case("data-empty-directory", ["data", "inspect", "{d}/empty"], {"empty/": ""}, expect=("empty", "no data files")),
    Case("data-missing-split", ["data", "inspect", "{d}/splits", "--split", "test"], {"splits/train.jsonl": STD},
         expect=("splits", "no files for split 'test'", "--split train")),
    Case("data-json-object-without-a-list", ["data", "inspect", "{d}/a.json"], {"a.json": '{"rows": 1}'},
         expect=("a.json", "expected a list of records", "found keys: rows")),
    Case("data-json-scalar", ["data", "inspect", "{d}/a.json"], {"a.json": "3"},
         expect=("a.json", "expected a list of records, got int")),
    Case("data-malformed-json-file", ["data", "inspect", "{d}/a.json"], {"a.json": '[\n{"prompt": "p",\n'},
         expect=("a.json:3", "malformed JSON")),
    Case("data-csv-row-too-long", ["data", "inspect", "{d}/a.csv"], {"a.csv": "prompt,chosen,rejected\np,a,b,c\n"},
         expect=("a.csv:2", "4 cells", "3 columns")),
    Case("data-corrupt-parquet", ["data", "inspect", "{d}/a.parquet"], {"a.parquet": b"not a parquet file"},
         expect=("a.parquet", "cannot read the Parquet file")),
    Case("data-label-not-boolean", ["data", "inspect", "{d}/a.jsonl"],
         {"a.jsonl": '{"prompt": "p", "completion": "c", "label": "maybe"}\n'},
         expect=("a.jsonl:1", "field 'label'", "expected a boolean")),
    Case("data-ranking-index-out-of-range", ["data", "inspect", "{d}/a.jsonl"],
         {"a.jsonl": '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 5]}\n'},
         expect=("a.jsonl:1", "field 'ranking'", "index 5 is out of range")),
    Case("data-scores-nan", ["data", "inspect", "{d}/a.jsonl"],
         {"a.jsonl": '{"prompt": "p", "responses": ["a", "b"], "scores": [NaN, 1]}\n'},
         expect=("a.jsonl:1", "field 'scores'", "finite")),
    Case("data-margin-not-a-number", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": STD[:-2] + ', "margin": "big"}\n'},
         expect=("a.jsonl:1", "field 'margin'", "expected a number")),
    Case("data-margin-infinite", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": STD[:-2] + ', "margin": Infinity}\n'},
         expect=("a.jsonl:1", "field 'margin'", "finite")),
    Case("data-message-without-content", ["data", "inspect", "{d}/a.jsonl"],
         {"a.jsonl": '{"messages": [{"role": "user"}]}\n'}, expect=("a.jsonl:1", "field 'messages'")),
    Case("data-messages-is-a-string", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": '{"messages": "hi"}\n'},
         expect=("a.jsonl:1", "field 'messages'", "got a string")),
    Case("data-sft-empty-text", ["data", "inspect", "{d}/a.jsonl"], {"a.jsonl": '{"text": " "}\n'},
         expect=("a.jsonl:1", "field 'text'", "empty text")),
    Case("data-tokenizer-missing", ["data", "inspect", "{d}/a.jsonl", "--tokenizer", "./no-such-tokenizer"],
         {"a.jsonl": STD}, expect=("field '--tokenizer'", "no such tokenizer directory")),
    # ---------------------------------------------------------------- prefs: ratings, rewards, comparisons, losses
    Case("prefs-rating-nan", ["prefs", "table", "{d}/r.csv"], {"r.csv": "group,y1,y2\ng1,nan,2\n"},
         expect=("r.csv:2", "field 'y1'", "not finite")),
    Case("prefs-rating-infinite", ["prefs", "aggregate", "{d}/r.csv"], {"r.csv": "group,y1,y2\ng1,1,-inf\n"},
         expect=("r.csv:2", "field 'y2'", "not finite")),
    Case("prefs-rating-empty-cell", ["prefs", "table", "{d}/r.csv"], {"r.csv": "group,y1,y2\ng1,,2\n"},
         expect=("r.csv:2", "field 'y1'", "not a number")),
    Case("prefs-rating-text", ["prefs", "table", "{d}/r.csv"], {"r.csv": "group,y1,y2\ng1,high,2\n"},
         expect=("r.csv:2", "field 'y1'", "'high' is not a number")),
    Case("prefs-ratings-empty-file", ["prefs", "table", "{d}/r.csv"], {"r.csv": ""},
         expect=("r.csv:1", "the file is empty")),
    Case("prefs-rating-negative-on-ratio-scale", ["prefs", "table", "{d}/r.csv", "--scale", "ratio"],
         {"r.csv": "group,y1,y2\ng1,-1,2\n"}, expect=("r.csv:2", "field 'y1'", "must be > 0")),
    Case("prefs-rating-zero-on-ratio-scale", ["prefs", "table", "{d}/r.csv", "--scale", "ratio"],
         {"r.csv": "group,y1,y2\ng1,1,0\n"}, expect=("r.csv:2", "field 'y2'", "must be > 0")),
    Case("prefs-rating-negative-on-logit-scale-is-accepted", ["prefs", "table", "{d}/r.csv", "--json"],
         {"r.csv": "group,y1,y2\ng1,-1,1\n"}, code=0, expect=('"most_preferred"',)),
    Case("prefs-one-response", ["prefs", "table", "{d}/r.csv"], {"r.csv": "group,y1\ng1,1\n"},
         expect=("r.csv:1", "missing header")),
    Case("prefs-row-too-short", ["prefs", "table", "{d}/r.csv"], {"r.csv": "group,y1,y2\ng1,1\n"},
         expect=("r.csv:2", "1 rating but the header names 2 responses")),
    Case("prefs-duplicate-group", ["prefs", "aggregate", "{d}/r.csv"], {"r.csv": RATINGS + "g1,2,1\n"},
         expect=("r.csv:3", "duplicate group 'g1'")),
    Case("prefs-ratings-not-utf8", ["prefs", "table", "{d}/r.csv"], {"r.csv": b"group,y1,y2\ng\xff,1,2\n"},
         expect=("r.csv:2", "not UTF-8", "0xff")),
    Case("prefs-ratings-json-deep", ["prefs", "table", "{d}/r.json"], {"r.json": '{"g":\n' + DEEP + "}"},
         expect=("r.json:2", "nested")),
    Case("prefs-ratings-json-integer-too-long", ["prefs", "table", "{d}/r.json"],
         {"r.json": f'{{"g": {{"y1": {HUGE_INT}, "y2": 1}}}}'}, expect=("r.json", "4300 digits")),
    Case("prefs-ratings-json-boolean", ["prefs", "table", "{d}/r.json"], {"r.json": '{"g": {"y1": true, "y2": 1}}'},
         expect=("r.json:1", "field 'y1'", "not a number")),
    Case("prefs-ratings-json-list", ["prefs", "table", "{d}/r.json"], {"r.json": "[1, 2]"},
         expect=("r.json:1", "expected a non-empty object")),
    Case("prefs-ratings-json-malformed", ["prefs", "table", "{d}/r.json"], {"r.json": '{"g": {"y1": 1,\n "y2": }}'},
         expect=("r.json:2", "malformed JSON")),
    Case("prefs-reward-nan", ["prefs", "rank", "--rewards", "y1=nan,y2=1"],
         expect=("field '--rewards'", "'nan' of 'y1' is not finite")),
    Case("prefs-reward-infinite-in-a-file", ["prefs", "rank", "--rewards", "{d}/r.txt"], {"r.txt": "y1,1\ny2,inf\n"},
         expect=("r.txt:2", "field 'y2'", "not finite")),
    Case("prefs-reward-text", ["prefs", "rank", "--rewards", "y1=1,y2=high"], expect=("'high' of 'y2' is not a number",)),
    Case("prefs-rewards-file-missing", ["prefs", "rank", "--rewards", "{d}/rewards.txt"],
         expect=("rewards.txt", "field '--rewards'", "no such file")),
    Case("prefs-rewards-json-deep", ["prefs", "rank", "--rewards", "{d}/r.json"], {"r.json": DEEP_OBJECT},
         expect=("r.json:1", "nested")),
    Case("prefs-rewards-json-boolean", ["prefs", "rank", "--rewards", "{d}/r.json"],
         {"r.json": '{"y1": true, "y2": 1}'}, expect=("r.json:1", "field 'y1'", "not a number")),
    Case("prefs-top-k-zero", ["prefs", "rank", "--rewards", "y1=1,y2=2", "--top-k", "0"],
         expect=("field 'top_k'", "between 1 and 2")),
    Case("prefs-brackets-in-names-are-not-markup", ["prefs", "table", "{d}/r.csv"],
         {"r.csv": "group,[/y1],y2\n[/g],1,2\n"}, code=0, expect=("[/g]", "P([/y1]>y2)")),
    Case("prefs-brackets-in-player-names", ["prefs", "fit", "{d}/c.csv", "--bootstrap", "0"],
         {"c.csv": "a,b,winner\n[/m],n,n\n"}, code=0, expect=("[/m]",)),
    Case("prefs-comparisons-empty", ["prefs", "fit", "{d}/c.csv"], {"c.csv": ""}, expect=("c.csv:1", "empty")),
    Case("prefs-comparisons-no-header", ["prefs", "fit", "{d}/c.csv"], {"c.csv": "x,y,x\n"},
         expect=("c.csv:1", "missing column 'a'")),
    Case("prefs-comparison-winner-not-a-player", ["prefs", "fit", "{d}/c.csv"], {"c.csv": "a,b,winner\nm,n,o\n"},
         expect=("c.csv:2", "field 'winner'")),
    Case("prefs-comparison-with-itself", ["prefs", "fit", "{d}/c.jsonl"], {"c.jsonl": '{"a": "m", "b": "m", "winner": "m"}\n'},
         expect=("c.jsonl:1", "compared with itself")),
    Case("prefs-fit-prior-nan", ["prefs", "fit", "{d}/c.csv", "--prior", "nan"], {"c.csv": "a,b,winner\nm,n,m\n"},
         expect=("field 'prior'", "finite")),
    Case("prefs-fit-prior-negative", ["prefs", "fit", "{d}/c.csv", "--prior", "-1"], {"c.csv": "a,b,winner\nm,n,m\n"},
         expect=("field 'prior'", "> 0")),
    Case("prefs-loss-probability-above-one", dpo(policy_chosen="1.5"), expect=("field '--policy-chosen'", "(0, 1]")),
    Case("prefs-loss-probability-negative", dpo(ref_rejected="-0.3"), expect=("field '--ref-rejected'", "(0, 1]")),
    Case("prefs-loss-probability-zero", dpo(policy_rejected="0"), expect=("field '--policy-rejected'", "(0, 1]")),
    Case("prefs-loss-probability-nan", dpo(policy_chosen="nan"), expect=("field '--policy-chosen'",)),
    Case("prefs-loss-positive-log-probability", dpo("--log", policy_chosen="1", policy_rejected="-2", ref_chosen="-1",
                                                      ref_rejected="-1"),
         expect=("field '--policy-chosen'", "<= 0", "drop --log")),
    Case("prefs-loss-beta-zero", dpo("--beta", "0"), expect=("field '--beta'", "> 0")),
    Case("prefs-loss-sweep-backwards", dpo("--beta-sweep", "1:0.1:5"), expect=("field '--beta-sweep'",)),
    Case("prefs-loss-plot-unwritable", dpo("--beta-sweep", "0.1:1:3", "--plot", "/proc/no-such-dir/sweep.png"),
         expect=("sweep.png", "field '--plot'", "cannot write the plot")),
    Case("prefs-loss-plot-format", dpo("--beta-sweep", "0.1:1:3", "--plot", "{d}/sweep.txt"),
         expect=("sweep.txt", "field '--plot'", "not supported")),
    Case("prefs-loss-reward-nan", ["prefs", "loss", "reward", "--chosen", "nan", "--rejected", "1"],
         expect=("field '--chosen'", "finite")),
    Case("prefs-loss-simpo-zero-length", ["prefs", "loss", "simpo", "--policy-chosen", "0.1", "--policy-rejected",
                                          "0.2", "--chosen-length", "0"], expect=("field '--chosen-length'", ">= 1")),
    # ---------------------------------------------------------------- generate: checked before the model loads
    Case("generate-num-zero", gen("--num", "0"), {"prompts.txt": PROMPTS}, expect=("field 'num'", ">= 1", "hint:")),
    Case("generate-batch-size-zero", gen("--batch-size", "0"), {"prompts.txt": PROMPTS},
         expect=("field 'batch_size'", ">= 1")),
    Case("generate-max-new-tokens-zero", gen("--max-new-tokens", "0"), {"prompts.txt": PROMPTS},
         expect=("field 'max_new_tokens'", ">= 1")),
    Case("generate-max-new-tokens-negative", gen("--max_new_tokens", "-5"), {"prompts.txt": PROMPTS},
         expect=("field 'max_new_tokens'", "got -5")),
    Case("generate-min-above-max-new-tokens", gen("--min-new-tokens", "100"), {"prompts.txt": PROMPTS},
         expect=("field 'min_new_tokens'",)),
    Case("generate-temperature-negative", gen("--temperature", "-0.1"), {"prompts.txt": PROMPTS},
         expect=("field 'temperature'", ">= 0")),
    Case("generate-temperature-nan", gen("--temperature", "nan"), {"prompts.txt": PROMPTS},
         expect=("field 'temperature'", "finite")),
    Case("generate-top-p-zero", gen("--top-p", "0"), {"prompts.txt": PROMPTS}, expect=("field 'top_p'", "(0, 1]")),
    Case("generate-top-p-above-one", gen("--top_p", "1.5"), {"prompts.txt": PROMPTS}, expect=("field 'top_p'",)),
    Case("generate-top-k-negative", gen("--top-k", "-1"), {"prompts.txt": PROMPTS}, expect=("field 'top_k'",)),
    Case("generate-unknown-template", gen("--template", "qa"), {"prompts.txt": PROMPTS},
         expect=("field 'template'", "{prompt}")),
    Case("generate-unknown-backend", gen("--backend", "tf"), {"prompts.txt": PROMPTS}, expect=("field 'backend'",)),
    Case("generate-empty-stop-string", gen("--stop", ""), {"prompts.txt": PROMPTS}, expect=("field 'stop'",)),
    Case("generate-output-txt", gen("--output", "{d}/out.txt"), {"prompts.txt": PROMPTS},
         expect=("out.txt", "field 'output'", ".jsonl")),
    Case("generate-output-directory", gen("--output", "{d}/outdir"), {"prompts.txt": PROMPTS, "outdir/": ""},
         expect=("outdir", "field 'output'", "is a directory")),
    Case("generate-prompts-not-utf8", gen(), {"prompts.txt": b"hello\nw\xf6rld\n"},
         expect=("prompts.txt:2", "not UTF-8", "byte 0xf6 at column 2")),
    Case("generate-prompts-empty", gen(), {"prompts.txt": "\n \n"}, expect=("prompts.txt", "no prompts found")),
    Case("generate-prompts-missing", gen(), expect=("prompts.txt", "file not found")),
    Case("generate-prompts-directory", gen(prompts="{d}"), expect=("cannot read the file",)),
    Case("generate-prompts-jsonl-without-prompt", gen(prompts="{d}/p.jsonl"), {"p.jsonl": '{"text": "x"}\n'},
         expect=("p.jsonl:1", "field 'prompt'", "neither 'prompt' nor 'messages'")),
    Case("generate-prompts-jsonl-prompt-number", gen(prompts="{d}/p.jsonl"), {"p.jsonl": '{"prompt": "a"}\n{"prompt": 3}\n'},
         expect=("p.jsonl:2", "field 'prompt'")),
    Case("generate-prompts-jsonl-deep", gen(prompts="{d}/p.jsonl"), {"p.jsonl": '{"prompt": ' + DEEP + "}\n"},
         expect=("p.jsonl:1", "nested")),
    Case("generate-prompts-jsonl-malformed", gen(prompts="{d}/p.jsonl"), {"p.jsonl": '{"prompt": "x"\n'},
         expect=("p.jsonl:1", "malformed JSON")),
    Case("generate-unknown-device", gen("--device", "tpu"), {"prompts.txt": PROMPTS},
         expect=("field 'device'", "unknown device 'tpu'")),
    # ---------------------------------------------------------------- score: the data is read before the model
    Case("score-data-missing", score("{d}/nope.jsonl"), expect=("nope.jsonl", "file not found")),
    Case("score-normalize-on-missing", score("{d}/g.jsonl", "--normalize-on", "{d}/ref.jsonl"), {"g.jsonl": GENS},
         expect=("ref.jsonl", "file not found")),
    Case("score-data-empty", score("{d}/g.jsonl"), {"g.jsonl": ""}, expect=("g.jsonl", "no records")),
    Case("score-generation-without-prompt", score("{d}/g.jsonl"), {"g.jsonl": '{"completion": "c"}\n'},
         expect=("g.jsonl:1", "field 'prompt'", "missing field")),
    Case("score-completion-is-a-number", score("{d}/g.jsonl"), {"g.jsonl": GENS + '{"prompt": "p", "completion": 3}\n'},
         expect=("g.jsonl:3", "field 'completion'", "got int")),
    Case("score-malformed-json", score("{d}/g.jsonl"), {"g.jsonl": '{"prompt": \n'}, expect=("g.jsonl:1", "malformed")),
    Case("score-deep-json", score("{d}/g.jsonl"), {"g.jsonl": '{"prompt": "p", "completion": ' + DEEP + "}\n"},
         expect=("g.jsonl:1", "nested")),
    Case("score-reference-set-bad", score("{d}/g.jsonl", "--normalize_on", "{d}/ref.jsonl"),
         {"g.jsonl": GENS, "ref.jsonl": GENS + "not json\n"}, expect=("ref.jsonl:3", "malformed JSON")),
    Case("score-preferences-with-empty-chosen", score("{d}/prefs.jsonl"), {"prefs.jsonl": STD.replace('"4"', '""')},
         expect=("prefs.jsonl:1", "field 'chosen'", "empty text")),
    Case("score-batch-size-zero", score("{d}/g.jsonl", "--batch-size", "0"), {"g.jsonl": GENS}, code=2,
         expect=("--batch-size",)),
    # ---------------------------------------------------------------- compare
    Case("compare-one-file", compare("{d}/a.jsonl"), {"a.jsonl": GENS, "judge.py": JUDGE}, expect=("at least two",)),
    Case("compare-missing-file", compare("{d}/a.jsonl", "{d}/nope.jsonl"), {"a.jsonl": GENS, "judge.py": JUDGE},
         expect=("nope.jsonl",)),
    Case("compare-empty-file", compare("{d}/a.jsonl", "{d}/b.jsonl"), {"a.jsonl": GENS, "b.jsonl": "",
                                                                       "judge.py": JUDGE},
         expect=("b.jsonl", "no completions")),
    Case("compare-mismatched-prompts", compare("{d}/a.jsonl", "{d}/b.jsonl"),
         {"a.jsonl": GENS, "b.jsonl": OTHER_GENS, "judge.py": JUDGE}, expect=("no completion of b", "same prompts")),
    Case("compare-generation-missing-field", compare("{d}/a.jsonl", "{d}/b.jsonl"),
         {"a.jsonl": GENS, "b.jsonl": '{"prompt_id": 1, "prompt": "p1"}\n', "judge.py": JUDGE},
         expect=("b.jsonl:1", "field 'completion")),
    Case("compare-brackets-in-a-prompt", compare("{d}/a.jsonl", "{d}/b.jsonl"),
         {"a.jsonl": GENS.replace('"p1"', '"[/x] p1"'), "b.jsonl": GENS.replace('"p1"', '"[/x] p1"'),
          "judge.py": JUDGE}, code=0, expect=("[/x] p1",)),
    Case("compare-unknown-judge", ["compare", "{d}/a.jsonl", "{d}/a.jsonl", "--judge", "oracle", "--output", "{d}/c"],
         {"a.jsonl": GENS}, expect=("field 'judge'",)),
    # ---------------------------------------------------------------- the command line itself
    Case("cli-unknown-command", ["genrate"], code=2, expect=("No such command 'genrate'",)),
    Case("cli-unknown-option", ["generate", "--tempreature", "1"], code=2, expect=("No such option",)),
    Case("cli-missing-required-option", ["generate", "--prompts", "p.txt"], code=2, expect=("Missing option",)),
    Case("cli-text-for-a-number", gen("--num", "three"), {"prompts.txt": PROMPTS}, code=2, expect=("--num",)),
    Case("cli-missing-argument", ["data", "inspect"], code=2, expect=("Missing argument",)),
    Case("cli-brackets-in-a-path-are-not-markup", ["data", "inspect", "{d}/[/red]x[b].jsonl"],
         expect=("[/red]x[b].jsonl", "no such file")),
    Case("cli-underscore-spelling-of-a-flag", ["data", "inspect", "{d}/a.jsonl", "--drop_invalid", "--json"],
         {"a.jsonl": STD}, code=0, expect=('"format": "standard"',)),
    Case("cli-underscore-spelling-of-an-option", ["prefs", "rank", "--rewards", "y1=1,y2=0", "--top_k", "1", "--json"],
         code=0, expect=('"top_k_probability"',)),
    Case("cli-underscore-spelling-in-prefs-loss", ["prefs", "loss", "dpo", "--policy_chosen", "0.5", "--policy_rejected",
                                                   "0.2", "--ref_chosen", "0.4", "--ref_rejected", "0.3", "--json"],
         code=0, expect=('"loss"',)),
]


def _write(directory: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = directory / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")


def test_the_corpus_is_large_and_ids_are_unique():
    """The issue asks for at least 60 bad inputs across data, prefs, generate, score, compare and the CLI."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 60
    assert {i.split("-")[0] for i in ids} == {"data", "prefs", "generate", "score", "compare", "cli"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.xfail)) if c.xfail
                                  else c for c in CASES], ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    _write(tmp_path, case.files)
    args = [a.replace("{d}", str(tmp_path)) for a in case.args]
    result = runner.invoke(app, args)
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{output}")
    assert "Traceback" not in output
    assert result.exit_code == case.code, output
    flat = " ".join(output.split())
    for text in case.expect:
        assert " ".join(text.replace("{d}", str(tmp_path)).split()) in flat, output
    if case.code == 1:  # one line, then at most one hint line
        lines = output[output.index("error:"):].strip().splitlines()
        assert len(lines) == 1 or (len(lines) == 2 and lines[1].strip().startswith("hint:")), output
