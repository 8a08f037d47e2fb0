"""The CLI driven with click's CliRunner, and the README blocks that come from it."""

import json

from click.testing import CliRunner

from standardwebhooks.webhooks import Webhook
from tunedrop.cli import cli
from tunedrop.readme import README, blocks, render


def test_validate_accepts_the_sample_with_exit_0():
    result = CliRunner().invoke(cli, ["validate", "samples/chat-sample.jsonl", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["accepted"] is True and report["errors"] == [] and report["stats"]["examples"] == 48


def test_validate_rejects_with_exit_1_and_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(12)]
    rows[4]["messages"][1]["role"] = "bot"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = CliRunner().invoke(cli, ["validate", str(bad), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)  # exactly one JSON object on stdout
    (error,) = report["errors"]
    assert error["line"] == 5 and error["code"] and "assistant" in error["message"]
    human = CliRunner().invoke(cli, ["validate", str(bad)])
    assert human.exit_code == 1 and "line 5" in human.output


def test_validate_missing_file_exits_2(tmp_path):
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "nope.jsonl"), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.output)["errors"][0]["code"] == "unreadable"


def test_secret_makes_a_usable_standard_webhooks_secret():
    secret = CliRunner().invoke(cli, ["secret"]).output.strip()
    assert secret.startswith("whsec_")
    Webhook(secret)  # the reference implementation accepts it


def test_status_without_a_running_host_says_how_to_start_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEDROP_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("TUNEDROP_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1 and "tunedrop up" in result.output


def test_readme_tables_match_the_code():
    text = README.read_text()
    assert render(text, blocks()) == text, "README is out of date: run `python -m tunedrop.readme`"
    assert "TUNEDROP_IDLE_MINUTES" in text and "learning_rate" in text
