"""Calibration data (text, JSONL, chat messages, bundled corpus) and the teacher-target KL math."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from deltahub.calibrate.data import CALIBRATION_SHARE, cut_samples, load_samples, read_documents, token_stream
from deltahub.calibrate.targets import TeacherTargets, _keep, choose_top_k, kl_from_targets
from deltahub.errors import InputError

CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"


@pytest.fixture(scope="module")
def tok(model_dirs):
    return AutoTokenizer.from_pretrained(model_dirs["llama"]["base"])


def _file(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_text_file_is_one_document(tmp_path, tok):
    p = _file(tmp_path, "c.txt", "w1 w2 w3\nw4 w5\n" * 10)
    docs, desc = read_documents(p, tok)
    assert docs == ["w1 w2 w3\nw4 w5\n" * 10] and desc == f"text:{p}"
    s = load_samples(p, tok, samples=3, seq_len=8)
    assert s.tokens.shape == (3, 8) and s.tokens.dtype == torch.long and s.available == 6
    every = load_samples(p, tok, samples=6, seq_len=8).tokens  # all windows, in order
    assert every[0].tolist() == tok("w1 w2 w3 w4 w5 w1 w2 w3", add_special_tokens=False)["input_ids"]
    assert all(any(torch.equal(row, w) for w in every) for row in s.tokens)


def test_jsonl_texts_and_chat_messages(tmp_path, tok):
    p = _file(
        tmp_path,
        "c.jsonl",
        '{"text": "w1 w2"}\n\n{"messages": [{"role": "w3", "content": "w4 w5"}]}\n{"text": "w6"}\n',
    )
    tok.chat_template = CHAT_TEMPLATE
    try:
        docs, desc = read_documents(p, tok)
    finally:
        tok.chat_template = None
    assert desc == f"jsonl:{p}"
    assert docs[0] == "w1 w2" and docs[2] == "w6"
    assert docs[1].split() == ["<s>", "w3", "w4", "w5", "</s>"]
    ids = token_stream(docs, tok).tolist()
    eos = tok.eos_token_id
    assert ids == tok("w1 w2", add_special_tokens=False)["input_ids"] + [eos] + tok(
        docs[1], add_special_tokens=False
    )["input_ids"] + [eos] + tok("w6", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("c.txt", "", "is empty"),
        ("c.jsonl", "\n\n", "is empty"),
        ("c.jsonl", '{"text": ""}\n', "holds no text"),
        ("c.jsonl", "w1 w2 w3\n", "line 1 is not valid JSON"),
        ("c.jsonl", '["w1"]\n', 'neither "text" nor "messages"'),
        ("c.jsonl", '{"text": 3}\n', '"text" must be a string'),
        ("c.jsonl", '{"messages": "w1"}\n', '"messages" must be a non-empty list'),
        ("c.jsonl", '{"messages": [{"role": "user", "content": "w1"}]}\n', "chat template"),
        ("c.json", '[{"text": "w1 w2"}]', "is a .json file"),
        ("c.jsonl", '{"text": "w1 w2"}\n{"text": "w1 \\ud800 w2"}\n', "line 2 holds a character that is not valid Unicode"),
    ],
)
def test_bad_files_are_input_errors(tmp_path, tok, name, content, fragment):
    with pytest.raises(InputError) as exc:
        load_samples(_file(tmp_path, name, content), tok, samples=2, seq_len=4)
    assert fragment in str(exc.value) and exc.value.hint


def test_jsonl_line_separators_inside_strings_are_text(tmp_path, tok):
    # U+2028, U+2029 and U+0085 are valid raw inside a JSON string (json.dumps(ensure_ascii=False) writes
    # them): they must not split the line; CRLF line ends are fine too
    lines = [json.dumps({"text": f"w1 w2{sep}w3"}, ensure_ascii=False) for sep in ("\u2028", "\u2029", "\u0085")]
    path = _file(tmp_path, "c.jsonl", "\r\n".join(lines) + "\r\n")
    docs, _source = read_documents(path, tok)
    assert docs == [f"w1 w2{sep}w3" for sep in ("\u2028", "\u2029", "\u0085")]


def test_missing_file_directory_and_short_text(tmp_path, tok):
    with pytest.raises(InputError, match="does not exist"):
        load_samples(tmp_path / "nope.txt", tok, 2, 4)
    with pytest.raises(InputError, match="is not a file"):
        load_samples(tmp_path, tok, 2, 4)
    with pytest.raises(InputError, match="has 3 tokens, shorter than one sequence of 4"):
        load_samples(_file(tmp_path, "c.txt", "w1 w2 w3"), tok, 2, 4)
    with pytest.raises(InputError, match="at least 1 sample"):
        load_samples(_file(tmp_path, "d.txt", "w1 w2 w3"), tok, 0, 4)


def test_fewer_windows_than_samples_uses_what_is_there(tmp_path, tok, caplog):
    s = load_samples(_file(tmp_path, "c.txt", " ".join(f"w{i}" for i in range(20))), tok, samples=10, seq_len=8)
    assert s.tokens.shape == (2, 8) and s.available == 2
    assert "using those instead of 10" in caplog.text


def test_sample_choice_random_for_calibration_spread_for_eval():
    stream = torch.arange(1000)
    a, n = cut_samples(stream, 5, 10, spread=False, seed=0, what="x")
    b, _ = cut_samples(stream, 5, 10, spread=False, seed=0, what="x")
    c, _ = cut_samples(stream, 5, 10, spread=False, seed=1, what="x")
    assert n == 100 and torch.equal(a, b) and not torch.equal(a, c)
    assert all(int(row[0]) % 10 == 0 and torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10)) for row in a)
    spread, _ = cut_samples(stream, 5, 10, spread=True, seed=0, what="x")
    assert [int(r[0]) for r in spread] == [0, 250, 500, 740, 990]


def test_bundled_corpus_split_between_calibration_and_eval():
    from transformers import AutoTokenizer  # a real BPE-like tokenizer is not available offline: use bytes
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    docs, desc = read_documents(None, tok)
    assert desc == "bundled:alice.txt" and "Alice was beginning" in docs[0] and len(docs[0]) > 20_000
    total = len(token_stream(docs, tok))
    cal = load_samples(None, tok, samples=10_000, seq_len=16, role="calibration")
    ev = load_samples(None, tok, samples=10_000, seq_len=16, role="eval")
    assert cal.description == "bundled:alice.txt[:80%]" and ev.description == "bundled:alice.txt[80%:]"
    assert cal.available == int(total * CALIBRATION_SHARE) // 16
    assert ev.available == (total - int(total * CALIBRATION_SHARE)) // 16
    del AutoTokenizer


# ----------------------------------------------------------------------------- KL to targets
def _logits(seed: int, shape=(2, 5, 40)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_kl_full_targets_is_the_kl():
    t, s = _logits(0), _logits(1)
    logp, logq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    want = (logp.exp() * (logp - logq)).sum(-1)
    got = kl_from_targets(s, TeacherTargets(logp))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(kl_from_targets(t, TeacherTargets(logp)), torch.zeros(2, 5), atol=1e-5)


def test_kl_top_k_is_the_collapsed_kl_a_lower_bound_and_exact_at_k_equals_v():
    t, s = _logits(2), _logits(3)
    logp, logq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    full = (logp.exp() * (logp - logq)).sum(-1)
    for k in (1, 5, 20, 39):
        vals, idx, tail = _keep(logp, k)
        got = kl_from_targets(s, TeacherTargets(vals, idx, tail))
        # The same divergence computed directly on the collapsed distributions.
        p_k, q_k = vals.exp(), logq.gather(-1, idx).exp()
        p_t, q_t = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
        want = (p_k * (p_k.log() - q_k.log())).sum(-1) + p_t * (p_t.log() - q_t.log())
        assert torch.allclose(got, want, atol=1e-4), k
        assert bool((got <= full + 1e-5).all()), k
    vals, idx, tail = _keep(logp, 40)
    assert torch.allclose(kl_from_targets(s, TeacherTargets(vals, idx, tail)), full, atol=1e-4)


def test_kl_gradient_flows_to_the_student_only():
    t, s = _logits(4), _logits(5).requires_grad_(True)
    vals, idx, tail = _keep(F.log_softmax(t, -1), 8)
    kl_from_targets(s, TeacherTargets(vals, idx, tail)).mean().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_full_targets_when_small_top_k_when_big():
    assert choose_top_k(64, 128, 128) is None  # tiny vocabulary
    assert choose_top_k(2, 8, 49152) is None  # small enough to keep whole
    assert choose_top_k(64, 128, 49152) == 128
    assert choose_top_k(64, 128, 49152, top_k=50_000) is None
