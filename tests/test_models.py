"""Loading models, pad tokens, positions under left padding, reward scores at the last real token."""

from __future__ import annotations

import copy

import pytest
import torch

from preftune.data.collate import pad_sequences
from preftune.data.tokenize import tokenize_prompt_response
from preftune.models import (
    adapter_disabled,
    ensure_pad_token,
    last_token_index,
    load_policy,
    load_reward_model,
    load_tokenizer,
    position_ids_from_mask,
    reference_from,
    score_texts,
    sequence_scores,
)

TEXTS = [("Shall I compare thee ", "to a summer's day?"), ("To be, ", "or not to be"), ("Q: ", "yes")]


def test_positions_and_last_token_from_the_mask():
    """left [0,0,1,1,1] -> positions [0,0,0,1,2], last index 4; right [1,1,1,0,0] -> [0,1,2,0,0], 2."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]]
    assert last_token_index(mask).tolist() == [4, 2]


def test_missing_pad_token_becomes_eos_or_a_new_token(tiny_tokenizer, tiny_model_dir):
    """No pad but an EOS: pad = EOS (vocabulary unchanged). Neither: a new '<pad>' is added and
    load_policy grows the embedding matrix to the new vocabulary size."""
    no_pad = copy.deepcopy(tiny_tokenizer)
    no_pad.pad_token = None
    ensure_pad_token(no_pad)
    assert no_pad.pad_token == "</s>" and len(no_pad) == len(tiny_tokenizer)



def test_a_tokenizer_without_pad_or_eos_gets_a_new_pad_and_the_model_grows(tmp_path):
    """Vocabulary {a: 0, b: 1} with no special tokens: '<pad>' is added as id 2 (vocabulary 3), and
    load_policy resizes a 2-token model's embeddings to 3 rows and records pad_token_id 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from preftune.models.tiny import build_tiny_model

    raw = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1}, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    build_tiny_model(tok).save_pretrained(tmp_path / "m")
    ensure_pad_token(tok)
    assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("<pad>", 2, 3)
    model = load_policy(str(tmp_path / "m"), dtype="float32", tokenizer=tok)
    assert model.get_input_embeddings().num_embeddings == 3
    assert model.config.pad_token_id == 2


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    return load_reward_model(str(tiny_model_dir), dtype="float32").eval()


def _batch(tok, side):
    seqs = [tokenize_prompt_response(tok, p, r, max_length=64).input_ids for p, r in TEXTS]
    return pad_sequences(seqs, pad_value=tok.pad_token_id, padding_side=side)


def test_reward_scores_are_the_same_under_left_and_right_padding(tiny_tokenizer, reward_model):
    """Each row's score equals the score of that sequence alone (no padding), for both padding sides."""
    with torch.no_grad():
        right = sequence_scores(reward_model, *_batch(tiny_tokenizer, "right"))
        left = sequence_scores(reward_model, *_batch(tiny_tokenizer, "left"))
        alone = [sequence_scores(reward_model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
                 for ids in (tokenize_prompt_response(tiny_tokenizer, p, r, max_length=64).input_ids
                             for p, r in TEXTS)]
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, torch.cat(alone), atol=1e-5, rtol=0)
    assert right.dtype == torch.float32 and right.shape == (3,)


def test_scores_match_the_hf_head_where_its_pad_search_works(tiny_tokenizer, reward_model):
    """With a pad token distinct from EOS and right padding, Hugging Face's own pooled logits pick the
    same last token, so the two must agree."""
    ids, mask = _batch(tiny_tokenizer, "right")
    with torch.no_grad():
        hf = reward_model(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = sequence_scores(reward_model, ids, mask)
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)


def test_pad_equal_to_eos_still_scores_the_final_eos(tiny_tokenizer, tiny_model_dir):
    """With pad = EOS, the appended EOS has the pad id; the mask still marks it as real, so the score is
    taken at the EOS (equal to the unpadded sequence's last-token score), not at the token before."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    model = load_reward_model(str(tiny_model_dir), dtype="float32", tokenizer=tok).eval()
    seqs = [tokenize_prompt_response(tok, p, r, max_length=64).input_ids for p, r in TEXTS]
    ids, mask = pad_sequences(seqs, pad_value=tok.pad_token_id, padding_side="right")
    with torch.no_grad():
        batch = sequence_scores(model, ids, mask)
        eos_alone = sequence_scores(model, torch.tensor([seqs[2]]), torch.ones(1, len(seqs[2]), dtype=torch.long))
        before_eos = sequence_scores(model, torch.tensor([seqs[2][:-1]]), torch.ones(1, len(seqs[2]) - 1,
                                                                                     dtype=torch.long))
    assert batch[2].item() == pytest.approx(eos_alone.item(), abs=1e-5)
    assert batch[2].item() != pytest.approx(before_eos.item(), abs=1e-5)


def test_score_texts_is_batch_size_invariant(tiny_tokenizer, reward_model):
    prompts, responses = zip(*TEXTS, strict=True)
    one = score_texts(reward_model, tiny_tokenizer, prompts, responses, batch_size=1)
    three = score_texts(reward_model, tiny_tokenizer, prompts, responses, batch_size=3)
    assert one == pytest.approx(three, abs=1e-5) and len(one) == 3


def test_lora_adapter_disabled_is_the_base_model(tiny_model_dir, tiny_tokenizer):
    """After changing the adapter's B matrices (so the adapted model differs), the adapter-disabled
    forward equals the plain base model; reference_from gives a frozen copy."""
    base = load_policy(str(tiny_model_dir), dtype="float32").eval()
    lora = load_policy(str(tiny_model_dir), dtype="float32", lora={"r": 2, "target_modules": ["q_proj"]})
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    ids = torch.tensor([tiny_tokenizer("To be, or not to be")["input_ids"]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        lora.eval()
        adapted = lora(input_ids=ids).logits
        with adapter_disabled(lora) as ref:
            got = ref(input_ids=ids).logits
    assert not torch.allclose(adapted, want, atol=1e-4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    frozen = reference_from(base)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_load_tokenizer_of_a_missing_model_is_a_clear_error(tmp_path):
    """A missing local path is "no such directory" (not a hub "repo id" error), named by the given key."""
    from preftune.errors import PreftuneError

    with pytest.raises(PreftuneError, match="no such directory") as err:
        load_tokenizer(str(tmp_path / "nope"), field="ref_model")
    assert err.value.field == "ref_model" and "Repo id" not in str(err.value)


# ---------------------------------------------------------------------------------------------- where a model is
@pytest.mark.parametrize(("text", "path"), [
    ("./runs/x", True), ("/tmp/nope", True), ("~/models/m", True), ("../m", True), (".", True),
    ("runs/sft/final", True),   # three parts: a hub id has at most two
    ("runs/sft/", True), ("C:\\models\\m", True), ("a--b", True), ("-m", True), ("a..b/c", True),
    ("gpt2", False), ("org/model", False), ("Qwen/Qwen2.5-0.5B-Instruct", False), ("m", False),
    ("meta-llama/Llama-3.1-8B", False), ("in-memory", False),
])
def test_what_looks_like_a_local_path(text, path, tmp_path, monkeypatch):
    """The rule that decides "no such directory" against a hub error (run from an empty directory)."""
    from preftune.models.load import looks_like_path

    monkeypatch.chdir(tmp_path)
    assert looks_like_path(text) is path


def test_a_two_part_name_under_an_existing_folder_is_a_path(tmp_path, monkeypatch):
    """``runs/x`` is a well-formed hub id, but when ./runs exists it can only mean that folder's x."""
    from preftune.errors import PreftuneError
    from preftune.models.load import looks_like_path, model_source

    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("runs/sft-tinny")
    (tmp_path / "runs" / "sft-tiny").mkdir(parents=True)
    assert looks_like_path("runs/sft-tinny")
    with pytest.raises(PreftuneError, match="no such directory: 'runs/sft-tinny'") as err:
        model_source("runs/sft-tinny", field="ref_model")
    assert err.value.field == "ref_model" and "did you mean runs/sft-tiny?" in err.value.hint


def test_model_source_names_the_problem(tmp_path, tiny_model_dir, monkeypatch):
    """A model directory and a hub id pass; a file, a run directory (its model is in final/) and a
    directory without config.json are errors that say what the path is and name the key."""
    from preftune.errors import PreftuneError
    from preftune.models.load import model_source

    monkeypatch.chdir(tmp_path)
    assert model_source(str(tiny_model_dir)) == "dir"
    assert model_source("org/model") == "hub" and model_source("gpt2") == "hub"
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(PreftuneError, match="is a file, not a model directory") as err:
        model_source(str(tmp_path / "weights.bin"), field="reward")
    assert err.value.field == "reward"
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    with pytest.raises(PreftuneError, match="not a model directory") as err:
        model_source(str(run), field="value_model")
    assert err.value.field == "value_model" and f"did you mean {run / 'final'}?" in err.value.hint


def test_a_hub_id_offline_and_not_cached_says_how_to_download(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1: a hub id the local cache lacks is refused before loading, naming the key and
    `hf download`; once the cache holds its config.json it passes (a fake snapshot, no download)."""
    import huggingface_hub.constants

    from preftune.errors import PreftuneError
    from preftune.models.load import check_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    for name in ("gpt2", "org/model"):
        with pytest.raises(PreftuneError, match="not in the local Hugging Face cache") as err:
            check_model(name, field="ref_model")
        assert err.value.field == "ref_model" and f"hf download {name}" in err.value.hint
    repo = tmp_path / "cache" / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    assert check_model("org/model", field="ref_model") == "hub"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert check_model("gpt2") == "hub"  # online: left to from_pretrained (which may download it)


def test_loader_errors_name_the_key_they_came_from(tmp_path, tiny_model_dir):
    """A missing reference model is reported as `ref_model`, not `model` (load_reference's key)."""
    from preftune.errors import PreftuneError
    from preftune.models.load import build_reference

    policy = load_policy(str(tiny_model_dir))
    with pytest.raises(PreftuneError, match="no such directory") as err:
        build_reference(policy, ref_model=str(tmp_path / "no-ref"), lora=None)
    assert err.value.field == "ref_model"


def test_hub_load_failures_are_one_line_naming_the_key(tmp_path, monkeypatch):
    """What from_pretrained raises for a hub id (no network, unknown repo) becomes one line that names the
    key and says what to do; a local directory that fails to load keeps the loader's words, on one line."""
    from preftune.models.load import _load_error

    monkeypatch.chdir(tmp_path)
    offline = OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.\nCheck your internet connection or see how to run the library in "
                      "offline mode at 'https://huggingface.co/docs/transformers/installation#offline-mode'.")
    err = _load_error("org/model", offline, field="ref_model", what="model")
    assert err.field == "ref_model" and "not in the local Hugging Face cache" in err.message
    assert "HF_HUB_OFFLINE=1" in err.message and "hf download org/model" in err.hint
    unknown = OSError("org/nope is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'")
    err = _load_error("org/nope", unknown, field="reward", what="model")
    assert err.field == "reward" and err.message == "no model 'org/nope' on the Hugging Face hub and no local directory of that name"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    err = _load_error(str(tmp_path / "broken"), ValueError("Unrecognized model\nin broken"), field="model", what="model")
    assert err.message.startswith("cannot load a model from") and "\n" not in err.message
