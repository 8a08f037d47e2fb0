"""Tests for shared.datasets: the streaming chat-JSONL validator."""

from __future__ import annotations

import codecs
import gzip
import json
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.datasets import (
    CODES,
    ERROR_CODES,
    WARNING_CODES,
    Issue,
    Report,
    iter_conversations,
    validate_chunks,
    validate_path,
)

# --------------------------------------------------------------------------------------------
# helpers


def row(i: int = 0, *, system: bool = False, ultrachat: bool = True, **extra) -> dict:
    msgs = [
        {"role": "user", "content": f"question {i}?"},
        {"role": "assistant", "content": f"answer {i}."},
    ]
    if system:
        msgs.insert(0, {"role": "system", "content": "be brief"})
    r = {"messages": msgs}
    if ultrachat:
        r = {"prompt": msgs[-2]["content"], "prompt_id": f"{i:064x}", **r}
    r.update(extra)
    return r


def line(obj) -> bytes:
    return json.dumps(obj).encode()


def dataset(bad: bytes | None = None, *, before: int = 2, after: int = 10, start: int = 1000) -> bytes:
    """`before` valid rows, then `bad` (so it is line before+1), then `after` valid rows."""
    lines = [line(row(start + i)) for i in range(before)]
    if bad is not None:
        lines.append(bad)
    lines += [line(row(start + before + i)) for i in range(after)]
    return b"\n".join(lines) + b"\n"


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def codes(issues) -> list[str]:
    return [i.code for i in issues]


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be nice"}


def msgs(*messages, **top) -> bytes:
    return line({"messages": list(messages), **top})


# --------------------------------------------------------------------------------------------
# one case per code: (code, bad line, expected field, is_error, extra kwargs)

LINE_CASES = [
    ("line_too_long", line(row(1, extra_text="x" * 500)), None, True, {"max_line_bytes": 300}),
    ("invalid_utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', None, True, {}),
    ("nesting_too_deep", b"[" * 100_000, None, True, {}),
    ("invalid_json", b'{"messages": [}', None, True, {}),
    ("non_finite_number", b'{"messages": [], "score": NaN}', "score", True, {}),
    ("duplicate_key",
     b'{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}',
     "messages[0].content", True, {}),
    ("lone_surrogate",
     b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x\\ud83d y"}]}',
     "messages[1].content", True, {}),
    ("not_an_object", b'[{"messages": []}]', None, True, {}),
    ("missing_messages", line({"prompt": "p", "prompt_id": "1"}), "messages", True, {}),
    ("messages_not_list", line({"messages": {"role": "user"}}), "messages", True, {}),
    ("empty_messages", line({"messages": []}), "messages", True, {}),
    ("message_not_object", msgs("hi", A), "messages[0]", True, {}),
    ("missing_role", msgs(U, {"content": "x"}), "messages[1].role", True, {}),
    ("role_not_string", msgs(U, {"role": 2, "content": "x"}), "messages[1].role", True, {}),
    ("unknown_role", msgs(U, {"role": "bot", "content": "x"}), "messages[1].role", True, {}),
    ("missing_content", msgs(U, {"role": "assistant"}), "messages[1].content", True, {}),
    ("content_not_string", msgs(U, {"role": "assistant", "content": None}), "messages[1].content", True, {}),
    ("tool_calls_unsupported",
     msgs(U, {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}),
     "messages[1].tool_calls", True, {}),
    ("empty_content", msgs(U, {"role": "assistant", "content": " \n\t "}), "messages[1].content", True, {}),
    ("invalid_weight", msgs(U, {**A, "weight": 2}), "messages[1].weight", True, {}),
    ("prompt_not_string", msgs(U, A, prompt=5), "prompt", True, {}),
    ("prompt_id_not_string", msgs(U, A, prompt_id=None), "prompt_id", True, {}),
    ("system_not_first", msgs(U, S, A), "messages[1].role", True, {}),
    ("multiple_system_messages", msgs(S, U, S, A), "messages[2].role", True, {}),
    ("consecutive_same_role", msgs(U, U, A), "messages[1].role", True, {}),
    ("no_assistant_message", msgs(S, U), "messages", True, {}),
    ("all_weights_zero", msgs(U, {**A, "weight": 0}), "messages", True, {}),
    # warnings
    ("blank_line", b"   ", None, False, {}),
    ("unknown_message_key", msgs({**U, "name": "bob"}, A), "messages[0].name", False, {}),
    ("last_message_not_assistant", msgs(U, A, U), "messages[2].role", False, {}),
    ("duplicate_conversation", line(row(1000)), "messages", False, {}),
]


@pytest.mark.parametrize("code,bad,field,is_error,kw", LINE_CASES, ids=[c[0] for c in LINE_CASES])
def test_line_codes(code, bad, field, is_error, kw):
    report = validate_chunks([dataset(bad)], **kw)
    issues = report.errors if is_error else report.warnings
    assert codes(issues) == [code], report.summary(10)
    issue = issues[0]
    assert issue.line == 3
    assert issue.field == field
    assert issue.message and not issue.message.startswith(" ")
    assert report.accepted is (not is_error)
    if is_error:
        assert report.stats["invalid_examples"] == 1
        assert report.stats["examples"] == 12
    else:
        assert report.stats["warnings_by_code"] == {code: 1}


FILE_CASES = [
    ("empty_file", b"", None),
    ("empty_file", b"\n\r\n  \n", None),
    ("compressed_file", gzip.compress(dataset()), None),
    ("compressed_file", b"PK\x03\x04rest-of-zip", None),
    ("utf16_file", dataset().decode().encode("utf-16"), None),  # with BOM
    ("utf16_file", codecs.BOM_UTF16_BE + dataset().decode().encode("utf-16-be"), None),
    ("binary_file", dataset().decode().encode("utf-16-le"), 1),  # no BOM: NUL bytes
    ("binary_file", dataset(b'{"messages": "\x00\x01"}'), 3),
    ("too_few_examples", dataset(before=3, after=0), None),
]


@pytest.mark.parametrize("code,data,expected_line", FILE_CASES)
def test_file_codes(code, data, expected_line):
    report = validate_chunks(chunked(data, 4096))
    assert codes(report.errors) == [code], report.summary()
    assert report.errors[0].line == expected_line
    assert report.errors[0].field is None
    assert not report.accepted


def test_every_code_is_tested_and_documented():
    from tests.test_dataset_limits import LIMIT_CODES
    from tests.test_formats import TESTED_CODES

    tested = {c[0] for c in LINE_CASES} | {c[0] for c in FILE_CASES} | TESTED_CODES | LIMIT_CODES
    assert tested == set(CODES)
    assert not set(ERROR_CODES) & set(WARNING_CODES)
    for code in CODES:
        assert code.isidentifier() and code == code.lower()


# --------------------------------------------------------------------------------------------
# messages and hints


def test_file_level_messages_say_what_to_do():
    gz = validate_chunks([gzip.compress(dataset())])
    assert gz.errors[0].message.startswith("file is gzip-compressed:")
    u16 = validate_chunks([dataset().decode().encode("utf-16")])
    assert "file is UTF-16/binary" in u16.errors[0].message and "save it as UTF-8 JSONL" in u16.errors[0].message
    nul = validate_chunks([dataset().decode().encode("utf-16-le")])
    assert "file is UTF-16/binary" in nul.errors[0].message
    assert nul.stats["stopped_early"] is True


def test_unknown_role_suggests_allowed_roles():
    report = validate_chunks([dataset(msgs(U, {"role": "bot", "content": "x"}))])
    message = report.errors[0].message
    assert "system, user, assistant" in message and "'assistant'" in message
    report = validate_chunks([dataset(msgs({"role": "User", "content": "x"}, A))])
    assert "'user'" in report.errors[0].message


def test_too_few_examples_says_how_many():
    report = validate_chunks([dataset(b"{", before=3, after=0)], min_examples=10)
    assert codes(report.errors) == ["too_few_examples", "invalid_json"]
    assert "3 valid examples" in report.errors[0].message and "10" in report.errors[0].message


def test_duplicate_names_first_line():
    report = validate_chunks([dataset(line(row(1001)))])
    assert "line 2" in report.warnings[0].message
    assert report.stats["duplicates"] == 1


@pytest.mark.parametrize("value,field", [
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": NaN}]}',
     "messages[1].weight"),
    (b'{"messages": [1, 2, Infinity]}', "messages[2]"),
    (b'{"messages": [], "x": -Infinity}', "x"),
    (b"NaN", None),
])
def test_nan_and_infinity_rejected(value, field):
    json.loads(value)  # Python's json module would let these through
    report = validate_chunks([dataset(value)])
    assert codes(report.errors) == ["non_finite_number"]
    assert (report.errors[0].line, report.errors[0].field) == (3, field)


def test_content_list_and_invalid_weights():
    for weight in (2, "1", True, None, 0.5):
        report = validate_chunks([dataset(msgs(U, {**A, "weight": weight}))])
        assert codes(report.errors) == ["invalid_weight"], weight
    for weight in (0, 1, 1.0):
        report = validate_chunks([dataset(msgs(U, {**A, "weight": weight}, U, A))])
        assert report.accepted, (weight, report.summary())
    report = validate_chunks([dataset(msgs(U, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}))])
    assert codes(report.errors) == ["content_not_string"]
    assert "array" in report.errors[0].message


def test_several_errors_in_one_row_count_one_invalid_example():
    bad = msgs({"role": "bot", "content": ""}, {"role": "user"}, prompt=1)
    report = validate_chunks([dataset(bad)])
    assert codes(report.errors) == ["prompt_not_string", "unknown_role", "empty_content", "missing_content"]
    assert report.error_count == 4
    assert report.stats["invalid_examples"] == 1


def test_unknown_message_key_warned_once_counted_in_stats():
    data = dataset(msgs({**U, "name": "a"}, {**A, "name": "b"}), after=10)
    report = validate_chunks([data])
    assert report.accepted
    assert codes(report.warnings) == ["unknown_message_key"]
    assert report.stats["unknown_message_keys"] == {"name": 2}


def test_unknown_top_level_keys_are_fine():
    report = validate_chunks([dataset(line({**row(5), "source": "web", "meta": {"a": [1, 2]}}))])
    assert report.accepted and report.warning_count == 0 and report.error_count == 0


def test_openai_rows_with_system_and_weights():
    rows = [line({"messages": [S, U, {**A, "weight": 0}, {"role": "user", "content": f"q{i}"}, {**A, "weight": 1}]})
            for i in range(12)]
    report = validate_chunks([b"\n".join(rows)])
    assert report.accepted, report.summary()
    assert report.stats["messages"] == {"system": 12, "user": 24, "assistant": 24}


def test_pretty_printed_json_hint():
    data = json.dumps(row(1), indent=2).encode() + b"\n"
    report = validate_chunks([data])
    assert report.errors[1].code == "invalid_json" and report.errors[1].line == 1
    assert "pretty-printed" in report.errors[1].message


def test_bom_in_the_middle_hint():
    report = validate_chunks([dataset(codecs.BOM_UTF8 + line(row(3)))])
    assert codes(report.errors) == ["invalid_json"] and "byte-order mark" in report.errors[0].message


def test_missing_messages_hints():
    report = validate_chunks([dataset(line({"conversations": [{"from": "human", "value": "x"}]}))])
    assert "ShareGPT" in report.errors[0].message


# --------------------------------------------------------------------------------------------
# file format tolerance


def test_bom_crlf_and_trailing_blank_lines_accepted():
    data = codecs.BOM_UTF8 + dataset().replace(b"\n", b"\r\n") + b"\r\n\n   \n"
    report = validate_chunks(chunked(data, 3))
    assert report.accepted, report.summary()
    assert report.warning_count == 0
    assert report.stats["examples"] == 12
    assert report.stats["bytes"] == len(data)
    assert len(list(iter_conversations(chunked(data, 5)))) == 12


def test_no_final_newline_is_fine():
    report = validate_chunks([dataset().rstrip(b"\n")])
    assert report.accepted and report.stats["lines"] == 12


def test_blank_lines_in_the_middle_are_one_warning_per_run():
    data = dataset(b"\n\n", before=2)  # blank lines 3, 4 and 5 (the third from the join)
    report = validate_chunks([data])
    assert report.accepted
    assert [(w.code, w.line) for w in report.warnings] == [("blank_line", 3)]
    assert "lines 3-5" in report.warnings[0].message


def test_hostile_nesting_no_recursion_error():
    for hostile in (b"[" * 100_000, b'{"a":' * 50_000, b"[" * 100_000 + b"]" * 100_000):
        report = validate_chunks(chunked(dataset(hostile), 4096))
        assert codes(report.errors) == ["nesting_too_deep"]
        assert report.errors[0].line == 3


def test_nesting_boundary():
    def nested(levels: int) -> bytes:  # the row object is level 1
        return line({**row(1), "x": json.loads("[" * (levels - 1) + "]" * (levels - 1))})

    assert validate_chunks([dataset(nested(32))], max_depth=32).accepted
    assert codes(validate_chunks([dataset(nested(33))], max_depth=32).errors) == ["nesting_too_deep"]
    # brackets inside strings are text, not depth
    assert validate_chunks([dataset(line(row(1, note="[[[[" * 50 + '\\"{{{{' * 50)))]).accepted


def test_long_line_is_skipped_without_buffering():
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 8_000_000 + b'"}]}'
    data = dataset(big)
    pieces = chunked(data, 64 * 1024)
    tracemalloc.start()
    try:
        report = validate_chunks(iter(pieces), max_line_bytes=100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert codes(report.errors) == ["line_too_long"]
    assert report.errors[0].line == 3
    assert f"{len(big):,} bytes" in report.errors[0].message
    assert report.stats["examples"] == 12
    assert peak < 1_000_000  # the 8 MB line was never held


def test_line_exactly_at_limit():
    one = line(row(1))
    data = b"\r\n".join([one] * 12) + b"\r\n"
    assert validate_chunks(chunked(data, 7), max_line_bytes=len(one)).accepted
    report = validate_chunks(chunked(data, 7), max_line_bytes=len(one) - 1)
    assert report.error_count == 13  # 12 lines too long, then too few examples


# --------------------------------------------------------------------------------------------
# chunking, caps, stats, report


def _mixed_file() -> bytes:
    parts = [codecs.BOM_UTF8]
    for i in range(40):
        parts.append(line(row(i)) + (b"\r\n" if i % 3 else b"\n"))
    bad = [case[1] for case in LINE_CASES if case[0] != "line_too_long"]
    for b in bad:
        parts.append(b + b"\n")
    parts.append(b"x" * 5000 + b"\n")  # too long for max_line_bytes=2000
    parts.append(line(row(7)) + b"\n\n\n")
    return b"".join(parts)


def test_chunk_boundary_independence():
    data = _mixed_file()
    expected = validate_chunks([data], max_line_bytes=2000, max_errors=1000).to_dict()
    assert expected["error_count"] > 20 and expected["warning_count"] >= 4
    for size in (1, 7, 4096):
        got = validate_chunks(chunked(data, size), max_line_bytes=2000, max_errors=1000).to_dict()
        assert got == expected, size
        assert sum(1 for _ in iter_conversations(chunked(data, size), max_line_bytes=2000)) == expected["stats"]["examples"]


def test_max_errors_cap_keeps_true_count():
    data = dataset(b"\n".join([b"{bad"] * 100), after=20)
    report = validate_chunks(chunked(data, 999), max_errors=5)
    assert len(report.errors) == 5
    assert report.error_count == 100
    assert report.stats["errors_by_code"] == {"invalid_json": 100}
    assert [e.line for e in report.errors] == [3, 4, 5, 6, 7]
    assert "... and 95 more errors (invalid_json: 95)" in report.summary(limit=5)


def test_dataset_error_listed_first_even_when_capped():
    data = b"\n".join([b"{bad"] * 20)
    report = validate_chunks([data], max_errors=3)
    assert codes(report.errors) == ["too_few_examples", "invalid_json", "invalid_json"]
    assert report.error_count == 21


def test_warnings_capped():
    data = b"\n".join([line(row(1))] * 30)
    report = validate_chunks([data], max_errors=4)
    assert report.accepted
    assert len(report.warnings) == 4 and report.warning_count == 29
    assert report.stats["duplicates"] == 29


def test_ten_thousand_lines_and_iter_conversations(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        for i in range(10_000):
            f.write(line(row(i, system=i % 2 == 0, ultrachat=i % 3 != 0)) + b"\n")
    report = validate_path(path, chunk_size=4096)
    assert report.accepted, report.summary()
    s = report.stats
    assert (s["lines"], s["examples"], s["invalid_examples"], s["duplicates"]) == (10_000, 10_000, 0, 0)
    assert s["messages"] == {"system": 5000, "user": 10_000, "assistant": 10_000}
    assert s["bytes"] == path.stat().st_size
    assert s["chars_per_example"]["min"] <= s["chars_per_example"]["median"] <= s["chars_per_example"]["max"]
    assert report.source == "big.jsonl"
    with open(path, "rb") as f:
        convs = list(iter_conversations(iter(lambda: f.read(10_000), b"")))
    assert len(convs) == 10_000
    assert convs[1] == [{"role": "user", "content": "question 1?"}, {"role": "assistant", "content": "answer 1."}]


def test_iter_conversations_normalizes_and_skips_invalid():
    data = b"\n".join([
        msgs({**U, "name": "x"}, {**A, "weight": 1}),
        msgs(U),  # invalid: no assistant
        b"{oops",
        msgs(S, U, A),
    ])
    convs = list(iter_conversations([data]))
    assert convs == [[U, A], [S, U, A]]
    assert list(iter_conversations([gzip.compress(data)])) == []


def test_stats_chars_median():
    rows = [line({"messages": [{"role": "user", "content": "u" * n}, {"role": "assistant", "content": "a"}]})
            for n in (9, 1, 4, 99, 19, 49)]
    s = validate_chunks([b"\n".join(rows)], min_examples=1).stats
    assert s["chars_per_example"] == {"min": 2, "median": 15, "max": 100, "median_exact": True}


def test_sizes_keep_min_max_exact_and_sample_uniformly_past_their_capacity():
    from shared.datasets.stats import Sizes

    sizes = Sizes(capacity=51)
    for n in range(10_000):  # ascending: a sample that kept only the first values would sit near 25
        sizes.add(n)
    median, p95 = sizes.median_p95()
    assert (sizes.seen, sizes.min, sizes.max, len(sizes.sample), sizes.exact) == (10_000, 0, 9_999, 51, False)
    assert 2_500 < median < 7_500 and median < p95 <= 9_999
    few = Sizes(capacity=51)
    for n in (5, 1, 4):
        few.add(n)
    assert (few.median_p95(), few.min, few.max, few.exact) == ((4, 5), 1, 5, True)
    assert Sizes().median_p95() == (None, None)


def test_report_to_dict_shape_and_summary():
    report = validate_chunks([dataset(msgs(U, {"role": "bot", "content": "x"}))], source="train.jsonl")
    d = report.to_dict()
    assert set(d) == {"accepted", "errors", "warnings", "stats", "error_count", "warning_count"}
    assert d["errors"] == [{
        "line": 3, "code": "unknown_role", "message": d["errors"][0]["message"], "field": "messages[1].role",
    }]
    json.dumps(d)  # serialisable
    text = report.summary()
    assert text.startswith("train.jsonl: REJECTED: 1 error, 0 warnings")
    assert "line 3: messages[1].role: unknown role 'bot'" in text and text.endswith("(unknown_role)")
    ok = validate_chunks([dataset()])
    assert ok.summary().startswith("dataset: accepted: 0 errors, 0 warnings; 12 lines, 12 valid examples")
    assert str(Issue("empty_file", "file is empty")) == "file is empty (empty_file)"
    assert Report(False, [Issue("x", "y")], [], {}).error_count == 1


def test_memoryview_and_bytearray_chunks():
    data = dataset()
    half = len(data) // 2
    assert validate_chunks([memoryview(data)[:half], bytearray(data[half:])]).accepted


# --------------------------------------------------------------------------------------------
# properties: nothing raises, chunking never matters

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
message_like = st.dictionaries(
    st.sampled_from(["role", "content", "weight", "name", "tool_calls"]),
    st.sampled_from(["user", "assistant", "system", "bot", "", " ", "hi", None, 0, 1, 2, [], {}]),
    max_size=4,
)
row_like = st.fixed_dictionaries(
    {"messages": st.lists(message_like, max_size=5) | json_values},
    optional={"prompt": json_values, "prompt_id": json_values},
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


FRAGMENTS = [b"{", b"}", b"[", b"]", b",", b":", b" ", b"\n", b"\r\n", b"\r", b'"messages"', b'"role"',
             b'"content"', b'"weight"', b'"user"', b'"assistant"', b'"system"', b'"hi"', b'""', b"1", b"0",
             b"null", b"NaN", b"\xef\xbb\xbf", b"\x00", b"\xff", b"\xc3", b'"\\ud800"', b"\x1f\x8b"]
fragment_bytes = st.lists(st.sampled_from(FRAGMENTS), max_size=120).map(b"".join)


@SETTINGS
@given(st.binary(max_size=600) | fragment_bytes, st.integers(1, 64), st.integers(8, 200))
def test_arbitrary_bytes_never_raise(data, size, max_line):
    whole = validate_chunks([data], max_line_bytes=max_line, max_depth=4, min_examples=1)
    parts = validate_chunks(chunked(data, size), max_line_bytes=max_line, max_depth=4, min_examples=1)
    assert parts.to_dict() == whole.to_dict()
    assert whole.accepted == (whole.error_count == 0)
    list(iter_conversations(chunked(data, size), max_line_bytes=max_line, max_depth=4))


@SETTINGS
@given(st.lists(json_values | row_like, min_size=1, max_size=6), st.integers(1, 50))
def test_arbitrary_json_lines_never_raise(values, size):
    data = b"\n".join(json.dumps(v).encode() for v in values)
    whole = validate_chunks([data], max_depth=5)
    assert validate_chunks(chunked(data, size), max_depth=5).to_dict() == whole.to_dict()
    s = whole.stats
    assert s["examples"] + s["invalid_examples"] + s["blank_lines"] == s["lines"]
    assert len(list(iter_conversations([data], max_depth=5))) == s["examples"]


def _depth(v) -> int:
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    return 0


tricky_text = st.text(alphabet='[]{}"\\ab\n', max_size=12)
tricky_values = st.recursive(
    st.none() | st.integers() | tricky_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(tricky_text, children, max_size=3),
    max_leaves=25,
)


@SETTINGS
@given(tricky_values, st.integers(0, 6))
def test_depth_scan_matches_real_depth(value, limit):
    from shared.datasets.strict_json import too_deep

    assert too_deep(json.dumps(value).encode(), limit) == (_depth(value) > limit)
