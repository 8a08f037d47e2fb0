"""Dataset formats (.jsonl.gz, Parquet), token counting, the fast paths' strictness, the fault catalogue."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.datasets import (
    CODES,
    detect_format,
    iter_conversations,
    validate_chunks,
    validate_path,
)
from shared.datasets.report import IssueLog
from shared.tokens import EstimateTokenizer, estimate, find_tokenizer
from shared.training import TrainingConfig
from tests.test_validation import SETTINGS, chunked, codes, dataset, line, row

#: Codes whose tests live here (or in test_handlers), beside test_validation's per-code cases.
TESTED_CODES = {"corrupt_gzip", "invalid_parquet", "no_messages_column", "parquet_unavailable", "too_long",
                "bad_override", "test_in_train"}


def rows_data(n: int = 12) -> list[dict]:
    return [row(i) for i in range(n)]


# -- gzip ------------------------------------------------------------------------------------


def test_detect_format():
    assert [detect_format(n) for n in ("a.jsonl", "a.JSONL.GZ", "x/train.parquet", "a.json", "a.gz")] == [
        "jsonl", "jsonl.gz", "parquet", "jsonl", "jsonl.gz"]


@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 20])
def test_gzip_is_streamed_and_chunking_never_matters(size):
    data = dataset(line({"messages": [{"role": "bot", "content": "x"}]}))
    plain = validate_chunks([data])
    packed = gzip.compress(data)
    report = validate_chunks(chunked(packed, size), format="jsonl.gz")
    assert codes(report.errors) == ["unknown_role"] and report.errors[0].line == 3
    assert report.stats["format"] == "jsonl.gz" and report.stats["compressed_bytes"] == len(packed)
    assert {k: v for k, v in report.stats.items() if k not in ("format", "compressed_bytes")} == plain.stats


def test_gzip_multi_member_and_iter_conversations():
    data = dataset()
    half = data.index(b"\n", len(data) // 2) + 1
    packed = gzip.compress(data[:half]) + gzip.compress(data[half:])
    assert validate_chunks([packed], format="jsonl.gz").stats["examples"] == 12
    assert len(list(iter_conversations(chunked(packed, 100), format="jsonl.gz"))) == 12


def test_gzip_bomb_is_decompressed_in_bounded_pieces():
    packed = gzip.compress(b"\n" * (50 << 20))  # 50 MB of blank lines in ~50 KB
    seen = []
    from shared.datasets.formats import GZ_OUT, GzipReader

    for piece in GzipReader([packed]):
        seen.append(len(piece))
    assert max(seen) <= GZ_OUT and sum(seen) == 50 << 20


@pytest.mark.parametrize("data,words", [
    (dataset(), "not gzip-compressed"),
    (b"x", "not gzip-compressed"),
    (gzip.compress(dataset())[:-30], "cut short"),
    (b"\x1f\x8b\x07" + gzip.compress(dataset())[3:], "damaged"),
])
def test_corrupt_gzip(data, words):
    report = validate_chunks(chunked(data, 16), format="jsonl.gz")
    assert codes(report.errors) == ["corrupt_gzip"], report.summary()
    assert words in report.errors[0].message and report.errors[0].line is None and report.errors[0].field is None
    assert not report.accepted


def test_gzip_named_jsonl_still_rejected_with_a_hint(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(gzip.compress(dataset()))
    report = validate_path(path)
    assert codes(report.errors) == ["compressed_file"] and ".jsonl.gz" in report.errors[0].message
    (tmp_path / "data.jsonl.gz").write_bytes(path.read_bytes())
    assert validate_path(tmp_path / "data.jsonl.gz").accepted


# -- parquet -----------------------------------------------------------------------------------


def parquet_bytes(rows: list[dict], tmp_path: Path, **kw) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, **kw)
    return path.read_bytes()


def test_parquet_rows_are_checked_with_row_numbers(tmp_path):
    rows = rows_data(12)
    rows[4]["messages"][1]["role"] = "bot"
    data = parquet_bytes(rows, tmp_path, row_group_size=5)
    report = validate_chunks(chunked(data, 1000), format="parquet")
    assert codes(report.errors) == ["unknown_role"]
    assert (report.errors[0].line, report.errors[0].field) == (5, "messages[1].role")
    assert report.stats["examples"] == 11 and report.stats["format"] == "parquet"
    convs = list(iter_conversations([data], format="parquet"))
    assert len(convs) == 11 and convs[0] == rows[0]["messages"]


def test_parquet_nulls_mean_absent(tmp_path):
    # OpenAI rows next to ultrachat rows: prompt is null where absent; weight null where not given
    rows = [{"messages": [{"role": "user", "content": f"q{i}", "weight": None},
                          {"role": "assistant", "content": "a", "weight": 1 if i % 2 else None}],
             "prompt": None if i % 2 else f"q{i}"} for i in range(12)]
    report = validate_chunks([parquet_bytes(rows, tmp_path)], format="parquet")
    assert report.accepted, report.summary()


def test_parquet_file_level_faults(tmp_path, monkeypatch):
    no_messages = parquet_bytes([{"text": "hi"}] * 12, tmp_path)
    report = validate_chunks([no_messages], format="parquet")
    assert codes(report.errors) == ["no_messages_column"] and "text" in report.errors[0].message
    report = validate_chunks([dataset()], format="parquet")
    assert codes(report.errors) == ["invalid_parquet"] and report.errors[0].line is None
    truncated = parquet_bytes(rows_data(), tmp_path)[:-100]
    assert codes(validate_chunks([truncated], format="parquet").errors) == ["invalid_parquet"]
    assert codes(validate_chunks([], format="parquet").errors) == ["empty_file"]
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *a, **kw):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    report = validate_chunks([no_messages], format="parquet")
    assert codes(report.errors) == ["parquet_unavailable"] and ".jsonl" in report.errors[0].message


# -- tokens ------------------------------------------------------------------------------------


def test_too_long_warning_names_count_and_first_line():
    long = row(1)
    long["messages"][1]["content"] = "word " * 200  # 1000 chars: ~250 tokens by the estimate
    data = dataset(line(long))
    report = validate_chunks([data], tokenizer=EstimateTokenizer(), max_seq_length=100)
    assert report.accepted
    assert codes(report.warnings) == ["too_long"]
    w = report.warnings[0]
    assert (w.line, w.field) == (3, "messages") and "1 example" in w.message and "max_seq_length=100" in w.message
    tok = report.stats["tokens"]
    assert tok["over_max_seq_length"] == 1 and tok["max"] > 100 and tok["total_kept"] < tok["total"]
    assert tok["min"] <= tok["median"] <= tok["p95"] <= tok["max"] and tok["examples"] == 13
    assert tok["method"].startswith("estimate") and tok["exact"] is False
    assert "tokens per example" in report.summary()
    assert "tokens" not in validate_chunks([data]).stats  # switched off: no tokenizer


def test_token_batches_do_not_change_counts(monkeypatch):
    from shared.datasets import token_count

    data = b"\n".join(line(row(i)) for i in range(300))
    whole = validate_chunks([data], tokenizer=EstimateTokenizer(), max_seq_length=10).stats["tokens"]
    monkeypatch.setattr(token_count, "TOKEN_BATCH", 7)
    assert validate_chunks([data], tokenizer=EstimateTokenizer(), max_seq_length=10).stats["tokens"] == whole


def test_fast_tokenizer_from_the_model_cache(model_cache):
    cache = Path(os.environ.get("TUNEDROP_MODEL_CACHE", Path.home() / ".cache" / "tunedrop")).expanduser()
    tok = find_tokenizer("smollm2-135m-instruct", cache) or find_tokenizer("smollm2-135m-instruct", model_cache)
    if tok is None:
        pytest.skip("no SmolLM2 tokenizer cached on this machine")
    assert tok.count(["The capital of France is Paris."]) == [7]
    report = validate_chunks([dataset()], tokenizer=tok, max_seq_length=512)
    assert report.stats["tokens"]["exact"] is True and report.stats["tokens"]["over_max_seq_length"] == 0
    assert find_tokenizer("Phi-3-mini-4k-instruct", cache) is None


class _ThreadedEstimate(EstimateTokenizer):
    """The estimate, counted on the counting threads (as the fast tokenizer is), each batch finishing after a
    random delay so that batches complete out of order."""

    threads = True

    def __init__(self) -> None:
        import random
        import threading

        self._rng, self._lock = random.Random(5), threading.Lock()
        self.calls: set[str] = set()

    def count(self, texts):
        import threading
        import time

        with self._lock:
            delay = self._rng.random() / 500
            self.calls.add(threading.current_thread().name)
        time.sleep(delay)
        return super().count(texts)


def _long_and_multibyte_rows(n: int) -> bytes:
    rows = []
    for i in range(n):
        r = row(i)
        r["messages"][1]["content"] = ("café naïve 東京 😀 " * (i % 9)) + f"answer {i}" + " word" * (i % 40)
        rows.append(line(r))
    return b"\n".join(rows)


def test_counting_threads_keep_every_figure_and_the_order(monkeypatch):
    from shared.datasets import token_count

    data = _long_and_multibyte_rows(400)
    serial = validate_chunks([data], tokenizer=EstimateTokenizer(), max_seq_length=40)
    assert serial.stats["tokens"]["over_max_seq_length"] > 0 and codes(serial.warnings) == ["too_long"]
    monkeypatch.setattr(token_count, "counting_threads", lambda: 3)
    monkeypatch.setattr(token_count, "TOKEN_BATCH", 21)  # batches of 7 texts: dozens in flight, out of order
    threaded = _ThreadedEstimate()
    report = validate_chunks([data], tokenizer=threaded, max_seq_length=40)
    assert report.stats["tokens"] == serial.stats["tokens"]
    assert [(w.code, w.line, w.message) for w in report.warnings] == [
        (w.code, w.line, w.message) for w in serial.warnings]  # the first line over max_seq_length too
    assert threaded.calls and all(name.startswith("tunedrop-tokens") for name in threaded.calls)


def test_counting_threads_end_with_the_validation(monkeypatch):
    import threading

    from shared.datasets import token_count

    monkeypatch.setattr(token_count, "counting_threads", lambda: 2)
    monkeypatch.setattr(token_count, "TOKEN_BATCH", 8)
    data = _long_and_multibyte_rows(300)

    def counting() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("tunedrop-tokens")]

    threaded = _ThreadedEstimate()
    assert validate_chunks([data], tokenizer=threaded).accepted and threaded.calls and not counting()
    stopped = validate_chunks(chunked(data, 4096), tokenizer=_ThreadedEstimate(), max_tokens=500)  # stops early
    assert codes(stopped.errors) == ["too_many_tokens"] and stopped.stats["stopped_early"] and not counting()


def test_fast_counts_are_those_of_a_plain_encode(model_cache, monkeypatch):
    """The fast path (encode_batch_fast, len of each encoding, batches on several threads) counts exactly what
    encoding each text on its own counts: multi-byte text, special-token look-alikes, repeats, empty."""
    from shared.datasets import token_count
    from shared.datasets.token_count import TokenCounter

    cache = Path(os.environ.get("TUNEDROP_MODEL_CACHE", Path.home() / ".cache" / "tunedrop")).expanduser()
    tok = find_tokenizer("smollm2-135m-instruct", cache) or find_tokenizer("smollm2-135m-instruct", model_cache)
    if tok is None:
        pytest.skip("no SmolLM2 tokenizer cached on this machine")
    system = "You are a helpful assistant. Réponds en français, s'il te plaît."
    texts = [system, "", " ", "café naïve résumé", "東京は日本の首都です。", "😀👍🏽 👨‍👩‍👧", "e\u0301 vs \u00e9",
             "<|im_start|>user\nhi<|im_end|>", "tab\tnew\nline \\ \"quoted\"", "1234567890 3.14159",
             "https://example.com/a?b=c&d=%20", "x" * 5000, ("naïve 東京 😀 " * 300)]
    sample = [texts[i % len(texts)] if i % 3 else system for i in range(600)]  # the system prompt repeats
    plain = [len(tok._tok.encode(t, add_special_tokens=False).ids) for t in sample]
    assert tok.count(sample) == plain and tok.count(tuple(sample[:50])) == plain[:50]  # repeats: encoded once
    assert tok.count(texts) == [len(tok._tok.encode(t, add_special_tokens=False).ids) for t in texts]  # distinct

    class Plain:  # one encode per text, counted on the validator's thread
        method, exact = tok.method, True

        def count(self, batch):
            return [len(tok._tok.encode(t, add_special_tokens=False).ids) for t in batch]

    def counted(tokenizer) -> tuple[int, dict]:
        counter = TokenCounter(tokenizer, 200)
        for i in range(0, len(sample), 3):
            counter.add(i + 1, sample[i:i + 3])
        return counter.kept_so_far(), counter.stats(IssueLog(50))  # as the trainer, then as the validator

    monkeypatch.setattr(token_count, "counting_threads", lambda: 2)
    monkeypatch.setattr(token_count, "TOKEN_BATCH", 64)
    assert TokenCounter(tok, None).threads == 2 and TokenCounter(Plain(), None).threads == 1
    assert counted(tok) == counted(Plain())


def test_estimate_line():
    stats = validate_chunks([dataset()], tokenizer=EstimateTokenizer(), max_seq_length=512).stats
    config = TrainingConfig().with_overrides({"test_fraction": 0.5, "num_train_epochs": 2})
    est = estimate(stats, config, "local")
    assert est["training_tokens"] == int(stats["tokens"]["total_kept"] * 0.5 * 2)
    assert est["tokens_per_s"] == 83 and est["estimated_cost"] == 0 and est["source"] == "typical"
    assert est["estimated_seconds"] == pytest.approx(est["training_tokens"] / 83 + 12, abs=0.1)  # + a job's fixed cost
    assert estimate(stats, config, "azureml", tokens_per_s=10, cost_per_hour=36)["estimated_cost"] > 0
    report = validate_chunks([dataset()])
    assert estimate(report.stats, config, "local") is None


# -- the fast paths keep strict RFC 8259 --------------------------------------------------------

keys = st.sampled_from(["a", "b", "a:", ":", 'q"', "\\", "k\\\\"])
leaf = st.none() | st.integers() | st.text(alphabet='ab:"\\ \u00e9', max_size=6)


def _render(value, style: int) -> str:
    """JSON text with possibly duplicated keys (value is a list of pairs for objects)."""
    if isinstance(value, tuple):  # object as pairs
        sep = [":", " : ", ":\t"][style % 3]
        return "{" + ",".join(json.dumps(k, ensure_ascii=style % 2 == 0) + sep + _render(v, style)
                              for k, v in value[1]) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_render(v, style) for v in value) + "]"
    text = json.dumps(value, ensure_ascii=style % 2 == 0)
    return text.replace(":", "\\u003a") if style == 4 and isinstance(value, str) else text


objects = st.recursive(leaf, lambda children: st.lists(children, max_size=3)
                       | st.lists(st.tuples(keys, children), max_size=4).map(lambda p: ("obj", p)), max_leaves=12)


def _stdlib_sees_a_doubled_key(text: bytes) -> bool:
    """The reference: whether Python's json module meets an object with a key written twice."""
    seen = False

    def hook(pairs):
        nonlocal seen
        seen |= len({k for k, _ in pairs}) != len(pairs)
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return seen


@SETTINGS
@given(objects, st.integers(0, 5))
def test_duplicate_keys_found_exactly_as_the_stdlib_finds_them(value, style):
    from shared.datasets.strict_json import has_duplicate_key, loads

    text = _render(value, style).encode()
    seen_dup = _stdlib_sees_a_doubled_key(text)
    assert has_duplicate_key(text, loads(text)) == seen_dup


# Texts that stress the typed path's string count: quotes, backslashes (also last), colons, non-ASCII.
texts = st.text(alphabet='ab:"\\ \u00e9\U0001f600', min_size=1, max_size=6).filter(lambda t: not t.isspace())


def _string(text: str, rng: int) -> str:
    """A JSON string for text, spelled one of several valid ways."""
    out = json.dumps(text, ensure_ascii=rng % 2 == 0)
    if rng % 3 == 1:
        out = out[0] + out[1:-1].replace('\\"', "\\u0022") + out[-1]
    if rng % 5 == 2:
        out = out[0] + out[1:-1].replace("\\\\", "\\u005c") + out[-1]
    return out


def _key(name: str, rng: int) -> str:
    return '"' + name.replace("o", "\\u006f") + '"' if rng % 7 == 3 else f'"{name}"'


@SETTINGS
@given(st.lists(texts, min_size=2, max_size=6), st.booleans(), st.booleans(),
       st.none() | st.tuples(st.integers(0, 20), st.sampled_from(["role", "content", "weight", "messages", "prompt"])),
       st.integers(0, 1000))
def test_the_typed_path_finds_every_doubled_key(contents, system, prompt, dup, rng):
    """Rows of the documented shape are accepted on the typed path; one with a key written twice
    never is, however its strings are spelled (escapes that change the text's quote count)."""
    sep = [":", " : ", ":\t"][rng % 3]
    msgs = []
    roles = (["system"] if system else []) + ["user", "assistant"] * len(contents)
    for i, (role, text) in enumerate(zip(roles, contents + contents, strict=False)):
        pairs = [(_key("role", rng + i), _string(role, 0)), (_key("content", rng + i), _string(text, rng + i))]
        if dup and dup[1] in ("role", "content", "weight") and dup[0] % len(contents) == i:
            again = {"role": _string(role, 0), "content": _string(text, rng), "weight": "1"}[dup[1]]
            pairs.insert(rng % 3, (_key(dup[1], rng), again))
        msgs.append("{" + ",".join(k + sep + v for k, v in pairs) + "}")
    top = [(_key("messages", rng), "[" + ",".join(msgs) + "]")]
    if prompt:
        top.insert(0, (_key("prompt", rng), _string(contents[0], rng + 1)))
    if dup and dup[1] == "messages":
        top.insert(0, (_key("messages", rng), "[]"))
    if dup and dup[1] == "prompt":
        top.append((_key("prompt", rng), _string(contents[-1], rng)))
    text = ("{" + ",".join(k + sep + v for k, v in top) + "}").encode()

    seen_dup = _stdlib_sees_a_doubled_key(text)
    report = validate_chunks([text + b"\n"], min_examples=1)
    found = "duplicate_key" in [e.code for e in report.errors]
    assert found == seen_dup, (text, report.summary())
    if not seen_dup:
        assert report.accepted, (text, report.summary())


def test_fault_catalogue_is_in_step_with_the_code():
    from tunedrop.readme import FAULTS, faults_markdown

    assert FAULTS.read_text() == faults_markdown(), "docs/dataset-faults.md is out of date: run python -m tunedrop.readme"
    for code in CODES:
        assert f"`{code}`" in FAULTS.read_text()


# -- train/test pairs ----------------------------------------------------------------------------


def test_pair_names():
    from shared.datasets import pair_half

    assert pair_half("chat.jsonl") is None and pair_half("train.jsonl") is None and pair_half("x.train.txt") is None
    half = pair_half("data/chat.train.jsonl")
    assert (half.half, half.stem, half.partner_hint) == ("train", "data/chat.", "data/chat.test.jsonl")
    assert half.partner_names()[:3] == ["data/chat.test.jsonl", "data/chat.test.jsonl.gz", "data/chat.test.parquet"]
    folder = pair_half("runs/may/test.jsonl.gz")
    assert (folder.half, folder.stem, folder.partner_names()[0]) == ("test", "runs/may/", "runs/may/train.jsonl.gz")


def test_a_pair_is_validated_as_one_report_naming_each_file():
    from shared.datasets import validate_pair

    train = dataset()
    test_rows = [row(1000), {"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "x"}]},
                 {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]}]
    test = ("\n".join(json.dumps(r) for r in test_rows) + "\n").encode()
    report = validate_pair([train], [test], train_source="c.train.jsonl", test_source="c.test.jsonl")
    assert not report.accepted and report.error_count == 1
    (error,) = report.errors
    assert (error.file, error.line, error.code) == ("c.test.jsonl", 3, "empty_content")
    (warning,) = report.warnings
    assert (warning.file, warning.line, warning.code) == ("c.test.jsonl", 1, "test_in_train")
    assert "line 1 of the train file" in warning.message
    assert report.stats["examples"] == validate_chunks([train]).stats["examples"]
    assert report.stats["test"]["examples"] == 2 and report.stats["test"]["in_train"] == 1
    assert "c.test.jsonl: line 3" in report.summary() and "1 also in the train file" in report.summary()
    # the test file needs one example, not min_examples
    assert validate_pair([train], [test.split(b"\n")[1] + b"\n"]).accepted
