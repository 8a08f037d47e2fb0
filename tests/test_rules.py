"""The conversation rules exist once (shared/datasets/rules.py): both ways of reading a row reach the
same verdict, codes, fields and messages, and the quick filter in front of the rules never lets a
faulty conversation through."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from shared.datasets.rows import typed_loads
from shared.datasets.rules import NO_WEIGHT, ROLES, conversation_faults, looks_clean, message_faults
from shared.datasets.validator import Validator
from tests.test_validation import SETTINGS

contents = st.sampled_from(["hello", "", " ", "\t\n", "tail\\", 'say "hi"', "café", "😀 ok", "a\\\\"])
weights = st.sampled_from([NO_WEIGHT, NO_WEIGHT, 0, 1, 1.0, 0.0, 2, 0.5, -1])
messages = st.builds(lambda role, content, weight: (role, content, weight), st.sampled_from(ROLES), contents, weights)
rows = st.builds(
    lambda msgs, prompt, ascii_only: (msgs, prompt, ascii_only),
    st.lists(messages, min_size=1, max_size=6),
    st.sampled_from([None, "the question", "tail\\"]),
    st.booleans(),
)


def render(msgs, prompt, ascii_only) -> bytes:
    row = {}
    if prompt is not None:
        row = {"prompt": prompt, "prompt_id": "0" * 64}
    row["messages"] = [{"role": r, "content": c, **({} if w is NO_WEIGHT else {"weight": w})} for r, c, w in msgs]
    return json.dumps(row, ensure_ascii=ascii_only).encode()


def both_paths(data: bytes):
    out = []
    for typed in (True, False):
        v = Validator(min_examples=0, typed=typed)
        for _ in v.drive([data], "jsonl"):
            pass
        report = v.report("data.jsonl")
        out.append((report.to_dict(), v.invalid, v.examples))
    return out


@SETTINGS
@given(st.lists(rows, min_size=1, max_size=8))
def test_both_parse_paths_give_every_row_the_same_codes_fields_and_messages(many):
    lines = [render(*r) for r in many]
    assert all(typed_loads(line) for line in lines)  # every row is of the typed shape: the fast path reads it
    typed, general = both_paths(b"\n".join(lines) + b"\n")
    assert typed == general


def test_the_paths_agree_on_a_row_breaking_every_rule_at_once():
    row = {"messages": [{"role": "user", "content": " "}, {"role": "system", "content": "s"},
                        {"role": "system", "content": "t"}, {"role": "user", "content": "q", "weight": 3}]}
    typed, general = both_paths(json.dumps(row).encode())
    assert typed == general
    assert [e["code"] for e in typed[0]["errors"]] == ["empty_content", "invalid_weight"]  # message by message
    row["messages"][0]["content"] = "u"
    row["messages"][3].pop("weight")
    row["messages"].append({"role": "user", "content": "again"})
    typed, general = both_paths(json.dumps(row).encode())
    assert typed == general
    assert [e["code"] for e in typed[0]["errors"]] == [
        "system_not_first", "multiple_system_messages", "consecutive_same_role", "no_assistant_message"]


@SETTINGS
@given(st.lists(messages, min_size=1, max_size=6), st.booleans())
def test_the_quick_filter_never_passes_a_conversation_the_rules_refuse(msgs, escapes):
    roles = [r for r, _, _ in msgs]
    texts = [c for _, c, _ in msgs]
    ws = [w for _, _, w in msgs]
    faults = [f for i, (_, c, w) in enumerate(msgs) for f in message_faults(i, c, w, escapes)]
    faults = faults or conversation_faults(roles, ws)
    if looks_clean(roles, texts, ws, escapes):
        assert faults == []


def test_a_rule_is_applied_to_rows_either_path_reads(monkeypatch):
    """A new rule added to rules.py reaches the typed path too (the fault the old duplicated rules let slip)."""
    from shared.datasets import rows, rules

    def no_shouting(i, content, weight, escapes):
        found = rules.message_faults(i, content, weight, escapes)
        if content and content.isupper():
            found.append(("empty_content", "shouting", f"messages[{i}].content"))
        return found

    monkeypatch.setattr(rows, "message_faults", no_shouting)
    monkeypatch.setattr(rows, "looks_clean", lambda *a: False)  # a new rule is added to the filter too
    data = json.dumps({"messages": [{"role": "user", "content": "HEY"}, {"role": "assistant", "content": "hi"}]})
    typed, general = both_paths(data.encode())
    assert typed == general and typed[0]["errors"][0]["message"] == "shouting"
