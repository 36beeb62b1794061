"""The vLLM rollout backend (``rollout_backend: vllm``, ``preftune.train.vllm_rollout``) on CPU, against a
stand-in engine: vllm is not installed here and needs a GPU, so what runs is preftune's side of the
contract, with a fake that has the interface preftune uses (``LLM(**kwargs)``, ``generate(prompts,
params, use_tqdm=)``, ``apply_model``, ``reset_prefix_cache``, ``SamplingParams(**kwargs)``).

The fake records every weight sync and every request and answers with token ids drawn from each
request's seed (with tokens after the EOS, which a careless engine might return, to test the cut). A real
RLOO run with it checks: one engine, made at the first rollout from the policy's config; before each
rollout the engine holds exactly the policy's current weights, synced once per rollout that follows
updates (not per step), and its prefix cache dropped after each sync; each request is the row's query
token ids with the settings mapped one to one and the row's seed; training consumes the fake's tokens,
cut after the first EOS. The control: with the sync after updates skipped, the weight check fails.
"""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.train import resolve_config
from preftune.train.loop import read_metrics, train
from preftune.train.rloo import RLOOMethod
from preftune.train.rollout import rollout_seed
from preftune.train.vllm_rollout import VLLMRollout, cut_at_eos, load_weights, policy_weights, sampling_kwargs

PROMPTS = ["Shall I compare thee to a summer's day?", "To be, or not to be, that is the question:",
           "The quick brown fox jumps over the lazy dog.", "Please write a short poem about the sea."]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def letters(prompt: str, completion: str) -> float:
    return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


# ------------------------------------------------------------------------------------------------ the fake


class FakeEngine:
    """Records what preftune asks of a vLLM ``LLM``; its "model" keeps the weights it was given."""

    def __init__(self, api: FakeVLLM, **kwargs: Any) -> None:
        self.api, self.kwargs = api, kwargs
        self.config = json.loads((Path(kwargs["model"]) / "config.json").read_text())  # read while it exists
        self.tokenizer_saved = (Path(kwargs["tokenizer"]) / "tokenizer_config.json").is_file()
        self.weights: dict[str, torch.Tensor] = {}
        self.model = types.SimpleNamespace(load_weights=self._load_weights)
        api.engines.append(self)

    def _load_weights(self, weights: Any) -> set[str]:
        loaded = {name: tensor.detach().clone() for name, tensor in weights}
        self.weights.update(loaded)
        self.api.events.append(("sync", loaded))
        return set(loaded)

    def apply_model(self, func: Any) -> list[Any]:
        return [func(self.model)]

    def reset_prefix_cache(self) -> None:
        self.api.events.append(("reset", None))

    def generate(self, prompts: list[dict[str, Any]], params: list[Any], use_tqdm: bool = True) -> list[Any]:
        outputs = [self._answer(p["prompt_token_ids"], sp.kwargs) for p, sp in zip(prompts, params, strict=True)]
        self.api.events.append(("generate", {"prompts": [p["prompt_token_ids"] for p in prompts],
                                             "params": [sp.kwargs for sp in params], "outputs": outputs,
                                             "weights": {k: v.clone() for k, v in self.weights.items()}}))
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids)]) for ids in outputs]

    @staticmethod
    def _answer(prompt: list[int], params: dict[str, Any]) -> list[int]:
        """max_tokens ids from the request's seed; about half the rows get an EOS somewhere, tokens after it."""
        rng = random.Random(params["seed"])
        ids = [rng.randrange(10, 300) for _ in range(params["max_tokens"])]
        if rng.random() < 0.5:
            ids[rng.randrange(len(ids))] = params["stop_token_ids"][0]
        return ids


class FakeVLLM:
    """A stand-in for the vllm module: ``LLM`` and ``SamplingParams``, plus what they recorded."""

    __version__ = "fake"

    def __init__(self) -> None:
        self.engines: list[FakeEngine] = []
        self.events: list[tuple[str, Any]] = []

    def LLM(self, **kwargs: Any) -> FakeEngine:  # noqa: N802 (vllm's name)
        return FakeEngine(self, **kwargs)

    @staticmethod
    def SamplingParams(**kwargs: Any) -> Any:  # noqa: N802 (vllm's name)
        return types.SimpleNamespace(kwargs=kwargs)

    def of(self, kind: str) -> list[Any]:
        return [payload for name, payload in self.events if name == kind]


class Recorded(RLOOMethod):
    """RLOO that keeps, per rollout, the step, the policy's weights as generation starts and the items."""

    def __init__(self, api: FakeVLLM) -> None:
        super().__init__(prompts=PROMPTS, reward_fn=letters)
        self.vllm_api, self.seen = api, []

    def make_rollout(self, model: Any, rollout: int, step: int) -> dict[str, Any]:
        from preftune.models import unwrap

        policy = unwrap(model).policy
        self.seen.append({"step": step, "weights": {k: v.detach().clone() for k, v in policy.state_dict().items()}})
        buffer = super().make_rollout(model, rollout, step)
        self.seen[-1]["items"] = buffer["items"]
        return buffer


def _keys(model: Path, out: Path, **keys: Any) -> dict[str, Any]:
    return {"model": str(model), "output_dir": str(out), "batch_size": 2, "num_samples": 2, "max_new_tokens": 6,
            "max_length": 64, "learning_rate": 3e-2, "lr_scheduler": "constant", "log_every": 1,
            "report_to": "none", "dtype": "float32", "kl_coef": 0.1, "sample_every": 0, "seed": 0,
            "temperature": 0.9, "top_p": 0.95, "top_k": 7, "update_epochs": 2, "max_steps": 6,
            "rollout_backend": "vllm", **keys}


def _run(tiny_model_dir: Path, out: Path) -> tuple[Recorded, FakeVLLM]:
    api = FakeVLLM()
    method = Recorded(api)
    train(method, resolve_config("rloo", _keys(tiny_model_dir, out)))
    return method, api


def assert_engine_held_the_policy(method: Recorded, api: FakeVLLM) -> None:
    """At each rollout's generate call the engine's weights are the policy's current weights, name by
    name, shape and value; and training changed them between rollouts (so the check is not vacuous)."""
    generates = api.of("generate")
    assert len(generates) == len(method.seen)
    for call, seen in zip(generates, method.seen, strict=True):
        assert call["weights"].keys() == seen["weights"].keys()
        for name, tensor in seen["weights"].items():
            assert call["weights"][name].shape == tensor.shape, name
            assert torch.equal(call["weights"][name], tensor), (seen["step"], name)
    for before, after in zip(method.seen, method.seen[1:], strict=False):
        assert any(not torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])


# ------------------------------------------------------------------------------------------------ a run


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Recorded, FakeVLLM, Path]:
    out = tmp_path_factory.mktemp("vllm-rloo")
    method, api = _run(tiny_model_dir, out)
    return method, api, out


def test_one_engine_from_the_policys_config(run, tiny_model_dir):
    """One engine, made at the first rollout from a directory with the policy's config (architecture
    named) and tokenizer; random ("dummy") weights, then synced; the policy's dtype; max_length as the
    model length; vllm_gpu_memory_utilization; one GPU per engine, in this process."""
    method, api, _ = run
    assert len(api.engines) == 1
    engine = api.engines[0]
    assert engine.config["architectures"] == ["LlamaForCausalLM"]
    assert engine.config["vocab_size"] == method.model.policy.config.vocab_size and engine.tokenizer_saved
    kwargs = {k: v for k, v in engine.kwargs.items() if k not in ("model", "tokenizer")}
    assert kwargs == {"load_format": "dummy", "dtype": "float32", "seed": 0, "max_model_len": 64,
                      "gpu_memory_utilization": 0.3, "tensor_parallel_size": 1,
                      "distributed_executor_backend": "external_launcher", "enable_prefix_caching": True,
                      "trust_remote_code": False}


def test_weights_synced_once_per_rollout_after_updates(run):
    """update_epochs 2, max_steps 6: rollouts at steps 0, 2 and 4; one sync before each (the first at
    the engine's creation), none at steps 1, 3 and 5; each sync is every weight of the policy and is
    followed by dropping the prefix cache before the next request."""
    method, api, _ = run
    assert [s["step"] for s in method.seen] == [0, 2, 4]
    assert [name for name, _ in api.events] == ["sync", "reset", "generate"] * 3
    assert method.vllm.syncs == 3 and method.vllm.synced_step == 4
    for sync, seen in zip(api.of("sync"), method.seen, strict=True):
        assert sync.keys() == seen["weights"].keys()
    assert_engine_held_the_policy(method, api)


def test_requests_are_token_ids_with_the_settings_mapped(run, tiny_tokenizer):
    """Each row is one request: its query's token ids (no re-tokenisation) and SamplingParams with
    temperature, top_p, top_k, max_new_tokens -> max_tokens, the row's seed (seed, rollout, row), and a
    stop at the tokenizer's EOS only."""
    method, api, _ = run
    eos = tiny_tokenizer.eos_token_id
    for rollout, (call, seen) in enumerate(zip(api.of("generate"), method.seen, strict=True)):
        assert call["prompts"] == [item["query"].tolist() for item in seen["items"]]
        assert call["params"] == [{"n": 1, "temperature": 0.9, "top_p": 0.95, "top_k": 7, "max_tokens": 6,
                                   "min_tokens": 0, "seed": rollout_seed(0, rollout, row), "ignore_eos": True,
                                   "stop_token_ids": [eos], "detokenize": False}
                                  for row in range(len(call["prompts"]))]


def test_training_consumes_the_engines_tokens(run, tiny_tokenizer):
    """The rollout's completions are the fake's token ids cut after the first EOS (the transformers
    backend's cut), and the logged mean length is theirs."""
    method, api, out = run
    eos = tiny_tokenizer.eos_token_id
    records = read_metrics(out / "metrics.jsonl")
    for call, seen in zip(api.of("generate"), method.seen, strict=True):
        cut = [cut_at_eos(ids, eos) for ids in call["outputs"]]
        assert [item["response"].tolist() for item in seen["items"]] == [c.tolist() for c in cut]
        assert any(len(c) < 6 for c in cut) and any(len(c) == 6 and eos not in c.tolist() for c in cut)
        step = records[seen["step"]]
        assert step["completions/mean_length"] == pytest.approx(sum(len(c) for c in cut) / len(cut))


def test_control_without_the_sync_after_updates_the_check_fails(tiny_model_dir, tmp_path, monkeypatch):
    """The same run with only the engine's first sync: it generates from the starting weights, and the
    check of the tests above fails."""
    sync = VLLMRollout.sync

    def first_only(self: VLLMRollout, policy: Any, step: int) -> None:
        if self.syncs == 0:
            sync(self, policy, step)
        self.synced_step = step

    monkeypatch.setattr(VLLMRollout, "sync", first_only)
    method, api = _run(tiny_model_dir, tmp_path)
    assert len(api.of("sync")) == 1
    with pytest.raises(AssertionError):
        assert_engine_held_the_policy(method, api)


# ------------------------------------------------------------------------------------------------ setup errors


def _setup(config_keys: dict[str, Any], api: Any = None) -> None:
    from accelerate import Accelerator

    from preftune.train.base import RunContext
    from preftune.train.loop import _release

    config = resolve_config("rloo", config_keys)
    accelerator = Accelerator(cpu=True)
    method = RLOOMethod(prompts=PROMPTS, reward_fn=letters)
    method.vllm_api = api
    try:
        method.setup(RunContext(config=config, accelerator=accelerator, output_dir=Path(config.output_dir),
                                log=lambda message: None))
    finally:
        _release(accelerator)


def test_vllm_missing_is_a_clear_error_before_anything_loads(tmp_path, monkeypatch):
    """No vllm: the error says `pip install vllm` and that it needs a GPU. The model path does not exist,
    so an error about vllm (not about the model) shows the check ran before any loading."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(PreftuneError, match="rollout_backend.*vllm package") as err:
        _setup(_keys(tmp_path / "no-such-model", tmp_path / "out"))
    assert "pip install vllm" in str(err.value) and "GPU" in str(err.value)


def test_vllm_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=None, SamplingParams=None))
    with pytest.raises(PreftuneError, match="needs a GPU; this run's device is cpu"):
        _setup(_keys(tmp_path / "no-such-model", tmp_path / "out"))


def test_a_temperature_vllm_would_change_is_refused_at_setup(tmp_path):
    with pytest.raises(PreftuneError, match="field 'temperature': temperature 0.005 is below vLLM's floor"):
        _setup(_keys(tmp_path / "no-such-model", tmp_path / "out", temperature=0.005), FakeVLLM())


def test_transformers_backend_is_the_default(tiny_model_dir, tmp_path):
    config = resolve_config("rloo", {k: v for k, v in _keys(tiny_model_dir, tmp_path).items() if k != "rollout_backend"})
    assert config.rollout_backend == "transformers"
    with pytest.raises(PreftuneError, match="rollout_backend"):
        resolve_config("rloo", _keys(tiny_model_dir, tmp_path, rollout_backend="sglang"))


# ------------------------------------------------------------------------------------------------ the parts


def test_sampling_kwargs_map_one_to_one():
    from preftune.models.sampling import GenerationSettings

    settings = GenerationSettings(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=9, min_new_tokens=2)
    assert sampling_kwargs(settings, seed=2**62 + 5, eos_token_id=3) == {
        "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 9, "min_tokens": 2,
        "seed": 2**62 + 5, "ignore_eos": True, "stop_token_ids": [3], "detokenize": False}
    with pytest.raises(PreftuneError, match="field 'stop'"):
        sampling_kwargs(GenerationSettings(stop=["\n"]), seed=0, eos_token_id=3)


def test_cut_at_eos_keeps_the_first_eos():
    assert cut_at_eos([5, 2, 7, 2], 2).tolist() == [5, 2]
    assert cut_at_eos([5, 6], 2).tolist() == [5, 6] and cut_at_eos([5, 6], 2).dtype == torch.long


def test_a_sync_happens_only_when_the_step_moved(tiny_model_dir, tiny_tokenizer, tmp_path):
    from accelerate import Accelerator

    from preftune.models import load_policy
    from preftune.models.sampling import GenerationSettings

    api = FakeVLLM()
    config = resolve_config("rloo", _keys(tiny_model_dir, tmp_path))
    policy = load_policy(str(tiny_model_dir), dtype="float32")
    backend = VLLMRollout(api, config, tiny_tokenizer, Accelerator(cpu=True), log=lambda m: None, real=False)
    queries = [torch.tensor([1, 40, 41]), torch.tensor([1, 50])]
    settings = GenerationSettings(max_new_tokens=4)
    for step in (0, 0, 3, 3, 5):
        backend.sample(policy, queries, seeds=[1, 2], settings=settings, step=step)
    assert [name for name, _ in api.events if name != "reset"] == [
        "sync", "generate", "generate", "sync", "generate", "generate", "sync", "generate"]


def test_lora_weights_are_merged_into_a_copy(tiny_model_dir):
    """With LoRA the engine gets W + the adapter's delta under the plain model's names (what
    merge_and_unload gives), and the trained weights are untouched (no merge/unmerge round trip)."""
    import copy

    from preftune.models import load_policy

    policy = load_policy(str(tiny_model_dir), dtype="float32", lora={"r": 4, "lora_dropout": 0.0})
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = dict(policy_weights(policy))
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    changed = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6)
        changed += not torch.equal(tensor, load_policy(str(tiny_model_dir), dtype="float32").state_dict()[name])
    assert changed > 0  # the adapter moved some weights: the check compares merged values, not base ones
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_load_weights_falls_back_to_the_model_runner_and_else_says_what_to_install():
    got: list[str] = []
    model = types.SimpleNamespace(load_weights=lambda weights: got.extend(name for name, _ in weights))
    runner = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))
    old = types.SimpleNamespace(llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(
        driver_worker=runner)))
    load_weights(old, iter([("a.weight", torch.zeros(1))]))
    assert got == ["a.weight"]
    with pytest.raises(PreftuneError, match="apply_model"):
        load_weights(types.SimpleNamespace(), iter([]))
