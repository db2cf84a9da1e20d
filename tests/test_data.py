"""Tests for ctxjax.vocab (tiny BPE + ChatML) and ctxjax.data (records -> grain batches)."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from ctxjax.data import (
    DataConfig,
    check_budgets,
    check_has_context,
    encode_record,
    load_jsonl,
    make_iterator,
    resolve_context,
)
from ctxjax.hf import eos_and_pad, load_tokenizer, render_chat
from ctxjax.padding import bucket_batch, bucket_length, pad_left, pad_left_rows
from ctxjax.vocab import build_tokenizer

TEXTS = [
    "What is 12 + 30?",
    "What is 7 * 8?",
    "Answer with a single word.",
    "The capital of France is Paris.",
    "The capital of Japan is Tokyo.",
    "Reply in French.",
    "Always answer in uppercase.",
    "You are a pirate. Talk like one.",
    "Add the two numbers and give only the result.",
    "2024 was a leap year; 2023 was not.",
    "Sort the letters: d c b a",
    "The answer is 42.",
    "Translate 'cat' into Spanish: gato",
    "Count the vowels in banana: 3",
    "Hint: multiply first, then add.",
    "Move left, then down, then right.",
    "The goal G is two steps down.",
    "Remember: the hole H is deadly.",
    "Which is bigger, 19 or 91?",
    "Repeat the word twice: echo echo",
    "A B C D E F G H I J K L M N O P",
    "the quick brown fox jumps over the lazy dog",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
    "123456789 987654321 1000000",
    "Is 17 prime? yes",
    "Is 21 prime? no",
    "Name a color: blue",
    "Name an animal: otter",
    "Spell it backwards: olleh",
    "Be brief.",
    "Think step by step, then answer.",
]
CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
CHATML_SYSTEM = "<|im_start|>system\n{}<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tokenizer as a run would see it: built, saved, loaded back through ctxjax.hf."""
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(TEXTS, vocab_size=320).save_pretrained(path)
    return load_tokenizer(path)


def _records(n, **extra):
    return [
        {"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), **extra} for i in range(n)
    ]


def _cfg(**kw):
    base = dict(
        batch_size=4, max_prompt_tokens=32, max_context_prompt_tokens=64, context="Be brief."
    )
    return DataConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same_batches(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


# ------------------------------------------------------------------------------------------------
# vocab


def test_special_tokens_and_template(tokenizer):
    vocab = tokenizer.get_vocab()
    assert [vocab["<|pad|>"], vocab["<|im_start|>"], vocab["<|im_end|>"]] == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 0
    assert tokenizer.bos_token is None
    assert tokenizer("hi")["input_ids"] == tokenizer.encode("hi", add_special_tokens=False)


def test_chat_rendering_without_and_with_context(tokenizer):
    prompt, context = "What is 12 + 30?", "Always answer in uppercase."
    x_ids = render_chat(tokenizer, "", prompt)
    cx_ids = render_chat(tokenizer, context, prompt)
    # The exact ChatML text, written out by hand.
    assert tokenizer.decode(x_ids) == CHATML_USER.format(prompt)
    assert tokenizer.decode(cx_ids) == CHATML_SYSTEM.format(context) + CHATML_USER.format(prompt)
    assert x_ids == tokenizer(CHATML_USER.format(prompt))["input_ids"]
    # The special tokens split the text, so the user turn tokenizes the same after a system turn.
    assert len(cx_ids) > len(x_ids) and cx_ids[-len(x_ids) :] == x_ids
    assert x_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert cx_ids.count(tokenizer.eos_token_id) == 2 and x_ids.count(tokenizer.eos_token_id) == 1


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "  two  spaces ,  then . dots",
        "tabs\tand\nnewlines\n\n",
        "unseen: Straße, 東京, 🙂, naïve",
        "",
        " leading space",
        "x" * 50,
    ],
)
def test_decode_is_lossless(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_digits_are_single_tokens(tokenizer):
    ids = tokenizer("9876543210 plus 1000000")["input_ids"]
    tokens = [tokenizer.decode([i]) for i in ids]
    assert tokens[:10] == list("9876543210") and tokens[-7:] == list("1000000")
    # No merge anywhere in the vocabulary glued a digit to anything (the texts repeat many numbers).
    for piece in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([piece])
        if any(c.isdigit() for c in text):
            assert len(text) == 1, piece


def test_build_is_deterministic(tokenizer):
    a, b = build_tokenizer(TEXTS, vocab_size=320), build_tokenizer(TEXTS, vocab_size=320)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    more_texts = build_tokenizer([*TEXTS, "zebra zebra zebra"], vocab_size=320)
    assert more_texts.get_vocab() != a.get_vocab()
    # A fresh process (fresh hash seeds in Python and in the Rust trainer) builds the same one.
    code = (
        "import json,sys; from ctxjax.vocab import build_tokenizer; "
        "print(build_tokenizer(json.loads(sys.argv[1]), vocab_size=320).backend_tokenizer.to_str())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(TEXTS)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == a.backend_tokenizer.to_str()


def test_save_load_round_trip(tmp_path):
    built = build_tokenizer(TEXTS, vocab_size=320)
    built.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == built.chat_template
    assert loaded.get_vocab() == built.get_vocab()
    for ctx in ("", "Reply in French."):
        assert render_chat(loaded, ctx, "Name a color:") == render_chat(built, ctx, "Name a color:")


def test_build_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        build_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="at least one text"):
        build_tokenizer([])


# ------------------------------------------------------------------------------------------------
# padding helpers


def test_pad_left_matches_hand_computed():
    ids, mask = pad_left([[5, 6, 7], [9], []], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 9], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    assert pad_left([], 3, pad_id=1)[0].shape == (0, 3)
    with pytest.raises(ValueError, match="sequence 1 has 3 tokens > length 2"):
        pad_left([[1], [1, 2, 3]], 2, pad_id=0)


def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 7, 8, 9, 16, 17, 100)] == [8, 8, 8, 8, 16, 16, 32, 128]
    assert [bucket_length(n, minimum=1) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
    with pytest.raises(ValueError):
        bucket_length(-1)


def test_bucket_batch():
    # Powers of two up to 8, then multiples of 8.
    assert [bucket_batch(n) for n in (1, 2, 3, 5, 8, 9, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, 24]


def test_pad_left_rows_adds_filler_rows_with_one_real_token():
    ids, mask = pad_left_rows([[5, 6], [7]], 3, rows=4, pad_id=9)
    np.testing.assert_array_equal(ids, [[9, 5, 6], [9, 9, 7], [9, 9, 0], [9, 9, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    assert ids.dtype == np.int32 and mask.dtype == np.bool_


class _Tok:
    def __init__(self, eos, pad):
        self.eos_token_id, self.pad_token_id = eos, pad


def test_eos_and_pad_falls_back_to_eos_and_needs_eos():
    assert eos_and_pad(_Tok(2, 0)) == ((2,), 0)
    assert eos_and_pad(_Tok(2, None)) == ((2,), 2)
    with pytest.raises(ValueError, match="no eos_token_id"):
        eos_and_pad(_Tok(None, 0))


# ------------------------------------------------------------------------------------------------
# config, files, records


def test_config_range_checks_name_the_field():
    with pytest.raises(ValueError, match=r"^data\.batch_size must be >= 1, got 0$"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"data\.max_context_prompt_tokens must be >= 1, got -3"):
        DataConfig(max_context_prompt_tokens=-3)
    with pytest.raises(ValueError, match=r"data\.worker_count"):
        DataConfig(worker_count=-1)
    with pytest.raises(ValueError, match=r"data\.seed"):
        DataConfig(seed=-1)
    with pytest.raises(ValueError, match=r"data\.context and data\.context_file are both set"):
        DataConfig(context="Be brief.", context_file="ctx.txt")


def test_resolve_context(tmp_path):
    assert resolve_context(DataConfig(context="Be brief.")) == "Be brief."
    path = tmp_path / "ctx.txt"
    path.write_text("Reply in French.\nAlways.\n", encoding="utf-8")
    assert resolve_context(DataConfig(context_file=str(path))) == "Reply in French.\nAlways."
    with pytest.raises(FileNotFoundError, match=r"data\.context_file not found: .*nope\.txt"):
        resolve_context(DataConfig(context_file=str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"data\.context_file is empty"):
        resolve_context(DataConfig(context_file=str(tmp_path / "empty.txt")))


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_load_jsonl_reads_records_and_skips_blank_lines(tmp_path):
    lines = ['{"prompt": "a", "answer": "1"}', "", '{"prompt": "b", "context": "c", "id": 7}']
    path = _write(tmp_path, "ok.jsonl", lines)
    records = load_jsonl(path)
    assert records == [
        {"prompt": "a", "answer": "1", "_source": f"{path}:1"},
        {"prompt": "b", "context": "c", "id": 7, "_source": f"{path}:3"},
    ]


@pytest.mark.parametrize(
    "lines, line_no, message",
    [
        (['{"prompt": "a"}', '{"prompt": "b"}', '{"prompt": "c",'], 3, "malformed JSON"),
        (['{"prompt": "a"}', '{"answer": "b"}'], 2, "missing 'prompt'"),
        (['{"prompt": "a", "context": 5}'], 1, "'context' must be a string, got int"),
        (['{"prompt": "a"}', '{"prompt": "b", "answer": null}'], 2, "'answer' must be a string"),
        (['{"prompt": ["a"]}'], 1, "'prompt' must be a string"),
        (['{"prompt": "a"}', "", '["prompt", "b"]'], 3, "must be a JSON object, got list"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, lines, line_no, message):
    path = _write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{line_no}: .*{message}"):
        load_jsonl(path)


def test_load_jsonl_accepts_a_byte_order_mark_and_counts_columns_from_1(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [r["prompt"] for r in load_jsonl(path)] == ["a", "b"]
    # Columns as an editor shows them: the mark is not one; the 1st character is column 1.
    path.write_bytes('\ufeff{"prompt": "\u00e9", x}\n'.encode())
    with pytest.raises(ValueError, match=r"bom\.jsonl:1: malformed JSON .* at column 17\)"):
        load_jsonl(path)
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(
        ValueError, match=r"bom\.jsonl:2: not UTF-8 \(byte 0xe9 at byte column 16\)"
    ):
        load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------
# encoding


def test_encode_record_views_and_context_choice(tokenizer):
    cfg = _cfg()
    own = {"prompt": "Name a color:", "context": "Reply in French."}
    enc = encode_record(own, tokenizer, "Be brief.", cfg, index=5)
    x_ids = render_chat(tokenizer, "", own["prompt"])
    cx_ids = render_chat(tokenizer, own["context"], own["prompt"])
    expect_ids, expect_mask = pad_left([x_ids], 32, tokenizer.pad_token_id)
    np.testing.assert_array_equal(enc["prompt_ids"], expect_ids[0])
    np.testing.assert_array_equal(enc["prompt_mask"], expect_mask[0])
    assert enc["ctx_prompt_ids"].shape == (64,) and enc["ctx_prompt_ids"].dtype == np.int32
    assert enc["ctx_prompt_mask"].sum() == len(cx_ids)
    assert enc["ctx_prompt_ids"][enc["ctx_prompt_mask"]].tolist() == cx_ids  # its own context
    assert int(enc["index"]) == 5
    # No context of its own (missing or empty): the run-level context goes in front.
    for record in ({"prompt": "Name a color:"}, {"prompt": "Name a color:", "context": ""}):
        enc = encode_record(record, tokenizer, "Be brief.", cfg, index=0)
        run_ids = render_chat(tokenizer, "Be brief.", "Name a color:")
        assert enc["ctx_prompt_ids"][enc["ctx_prompt_mask"]].tolist() == run_ids
    # No context anywhere: both views are the same prompt.
    enc = encode_record({"prompt": "Name a color:"}, tokenizer, "", cfg, index=0)
    assert enc["ctx_prompt_ids"][enc["ctx_prompt_mask"]].tolist() == x_ids


def test_context_placement_in_the_user_message(tokenizer):
    """`data.context_placement=user`: the context goes before the prompt in the user turn (for
    templates with no system role); the no-context view is unchanged."""
    record = {"prompt": "Name a color:", "context": "Reply in French."}
    enc = encode_record(record, tokenizer, "", _cfg(context_placement="user"), index=0)
    user_ids = render_chat(tokenizer, record["context"], record["prompt"], placement="user")
    assert user_ids != render_chat(tokenizer, record["context"], record["prompt"])
    assert enc["ctx_prompt_ids"][enc["ctx_prompt_mask"]].tolist() == user_ids
    x_ids = render_chat(tokenizer, "", record["prompt"])
    assert enc["prompt_ids"][enc["prompt_mask"]].tolist() == x_ids
    with pytest.raises(ValueError, match=r"^data\.context_placement must be one of"):
        _cfg(context_placement="assistant")


def test_encode_budget_errors_name_record_and_key(tokenizer, tmp_path):
    cfg = _cfg(max_prompt_tokens=12, max_context_prompt_tokens=20)
    long_prompt = {"prompt": "the quick brown fox jumps over the lazy dog"}
    with pytest.raises(ValueError, match=r"record 5: .*data\.max_prompt_tokens=12"):
        encode_record(long_prompt, tokenizer, "", cfg, index=5)
    path = _write(tmp_path, "long.jsonl", ['{"prompt": "Be brief."}', json.dumps(long_prompt)])
    where = r"record 1 \(.*long\.jsonl:2\): "
    with pytest.raises(ValueError, match=where + r".*data\.max_prompt_tokens"):
        encode_record(load_jsonl(path)[1], tokenizer, "", cfg, index=1)
    record = {"prompt": "Be brief.", "context": "Think step by step, then answer."}
    cfg = _cfg(max_prompt_tokens=16, max_context_prompt_tokens=20)
    # Only the [c|x] view is over budget.
    assert len(render_chat(tokenizer, "", record["prompt"])) <= 16
    assert len(render_chat(tokenizer, record["context"], record["prompt"])) > 20
    with pytest.raises(ValueError, match=r"record 2: .*\[c\|x\].*max_context_prompt_tokens=20"):
        encode_record(record, tokenizer, "", cfg, index=2)


# ------------------------------------------------------------------------------------------------
# iterators


def test_batches_have_fixed_shapes_and_match_encode_record(tokenizer):
    records, cfg = _records(10), _cfg()
    batch = next(make_iterator(records, tokenizer, cfg))
    assert batch["prompt_ids"].shape == (4, 32) and batch["prompt_mask"].shape == (4, 32)
    assert batch["ctx_prompt_ids"].shape == (4, 64) and batch["ctx_prompt_mask"].shape == (4, 64)
    for row, index in enumerate(batch["index"]):
        enc = encode_record(records[index], tokenizer, "Be brief.", cfg, index=int(index))
        for key, value in enc.items():
            np.testing.assert_array_equal(batch[key][row], value)


def test_iterator_is_deterministic_by_seed(tokenizer):
    records = _records(24)
    first = _take(make_iterator(records, tokenizer, _cfg(seed=3)), 8)
    assert _same_batches(first, _take(make_iterator(records, tokenizer, _cfg(seed=3)), 8))
    assert not _same_batches(first, _take(make_iterator(records, tokenizer, _cfg(seed=4)), 8))
    ordered = _take(make_iterator(records, tokenizer, _cfg(shuffle=False)), 8)
    order = np.concatenate([b["index"] for b in ordered]).tolist()
    assert order == list(range(24)) + list(range(8))


def test_each_epoch_is_a_new_permutation(tokenizer):
    it = make_iterator(_records(12), tokenizer, _cfg(), num_epochs=2)
    batches = list(it)  # finite: 2 epochs x 12 records / 4 per batch
    assert len(batches) == 6
    epoch1 = np.concatenate([b["index"] for b in batches[:3]]).tolist()
    epoch2 = np.concatenate([b["index"] for b in batches[3:]]).tolist()
    assert sorted(epoch1) == sorted(epoch2) == list(range(12))
    assert epoch1 != epoch2 and epoch1 != list(range(12))


def test_get_state_set_state_resumes_exactly(tokenizer):
    records, cfg = _records(10), _cfg()
    it = make_iterator(records, tokenizer, cfg)
    _take(it, 3)  # 12 records read: past the first epoch boundary
    state = it.get_state()
    expected = _take(it, 6)
    resumed = make_iterator(records, tokenizer, cfg)
    resumed.set_state(state)
    assert _same_batches(_take(resumed, 6), expected)
    # The state survives a JSON round trip (how a checkpoint stores it).
    again = make_iterator(records, tokenizer, cfg)
    again.set_state(json.loads(json.dumps(state)))
    assert _same_batches(_take(again, 6), expected)


def test_process_rows_slice_the_same_global_batches(tokenizer):
    records, cfg = _records(14), _cfg(batch_size=4)
    full = _take(make_iterator(records, tokenizer, cfg), 5)
    # Two processes holding rows [0, 1] and [2, 3]: together the single-process global batch.
    halves = [_take(make_iterator(records, tokenizer, cfg, rows=r), 5) for r in ([0, 1], [2, 3])]
    for batch, low, high in zip(full, *halves, strict=True):
        assert _same_batches([batch], [{k: np.concatenate([low[k], high[k]]) for k in batch}])
    # The state does not depend on the rows: a checkpoint resumes under another process count.
    it = make_iterator(records, tokenizer, cfg, rows=[2, 3])
    _take(it, 3)
    resumed = make_iterator(records, tokenizer, cfg)
    resumed.set_state(it.get_state())
    assert _same_batches(_take(resumed, 2), full[3:])
    with pytest.raises(ValueError, match=r"rows must be positions in \[0, data.batch_size=4\)"):
        make_iterator(records, tokenizer, cfg, rows=[3, 4])


def test_iterator_rejects_too_few_records(tokenizer):
    with pytest.raises(ValueError, match="less than one batch"):
        make_iterator(_records(3), tokenizer, _cfg(), num_epochs=1)
    with pytest.raises(ValueError, match="no records"):
        make_iterator([], tokenizer, _cfg())


def test_worker_processes_give_the_same_batches_and_resume(tokenizer):
    records, cfg = _records(12), _cfg()
    expected = _take(make_iterator(records, tokenizer, cfg), 7)
    workers_cfg = dataclasses.replace(cfg, worker_count=2)
    it = make_iterator(records, tokenizer, workers_cfg)
    try:
        got = _take(it, 4)
        state = it.get_state()
    finally:
        it.close()
    assert _same_batches(got, expected[:4])
    resumed = make_iterator(records, tokenizer, workers_cfg)
    try:
        resumed.set_state(state)
        assert _same_batches(_take(resumed, 3), expected[4:])
    finally:
        resumed.close()


def test_check_budgets_finds_the_long_record_up_front(tokenizer):
    cfg = _cfg(max_prompt_tokens=16, max_context_prompt_tokens=32)
    records = [{"prompt": "add 1 2"}] * 3 + [
        {"prompt": "the quick brown fox jumps over the lazy dog"}
    ]
    check_budgets(records[:3], tokenizer, cfg)  # all fit: no error
    with pytest.raises(ValueError, match=r"record 3: .*data\.max_prompt_tokens=16"):
        check_budgets(records, tokenizer, cfg)


def test_check_has_context_refuses_nothing_to_distill(tmp_path):
    path = _write(tmp_path, "plain.jsonl", [json.dumps({"prompt": "Name a color:"})])
    records = load_jsonl(path)
    with pytest.raises(ValueError, match=r"^no record of .*plain\.jsonl has a 'context'"):
        check_has_context(records, "")
    check_has_context(records, "Be brief.")  # a run-level context is enough
    check_has_context([{"prompt": "x", "context": "Be brief."}], "")
