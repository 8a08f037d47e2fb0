"""The CLI driven with click's CliRunner, and the README blocks that come from it."""

import json
import os

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


def _rows(n: int, start: int = 0) -> str:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(start, start + n)]
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_validate_checks_a_pair_half_with_its_other_half(tmp_path):
    (tmp_path / "c.train.jsonl").write_text(_rows(12))
    (tmp_path / "c.test.jsonl").write_text(_rows(2, start=100) + '{"messages": []}\n')
    for given in ("c.train.jsonl", "c.test.jsonl"):  # either half names the pair
        result = CliRunner().invoke(cli, ["validate", str(tmp_path / given), "--json", "--no-tokens"])
        assert result.exit_code == 1, result.output
        report = json.loads(result.output)
        (error,) = report["errors"]
        assert (error["file"], error["line"], error["code"]) == ("c.test.jsonl", 3, "empty_messages")
        assert report["stats"]["examples"] == 12 and report["stats"]["test"]["examples"] == 2
    (tmp_path / "lone.train.jsonl").write_text(_rows(12))
    alone = CliRunner().invoke(cli, ["validate", str(tmp_path / "lone.train.jsonl"), "--no-tokens"])
    assert alone.exit_code == 0 and "lone.test.jsonl is not there" in alone.output


def test_validate_reads_the_sidecar_and_set_as_the_run_would(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(_rows(12))
    (tmp_path / "d.jsonl.tunedrop.json").write_text('{"num_train_epochs": 0}')
    result = CliRunner().invoke(cli, ["validate", str(data), "--json", "--no-tokens"])
    assert result.exit_code == 1
    (error,) = json.loads(result.output)["errors"]
    assert (error["code"], error["field"]) == ("bad_override", "sidecar") and "d.jsonl.tunedrop.json" in error["message"]
    (tmp_path / "d.jsonl.tunedrop.json").write_text('{"num_train_epochs": 1}')
    bad_set = CliRunner().invoke(cli, ["validate", str(data), "--json", "--no-tokens", "--set", "lora_rank=8"])
    (error,) = json.loads(bad_set.output)["errors"]
    assert bad_set.exit_code == 1 and (error["code"], error["field"]) == ("bad_override", "metadata")
    good = CliRunner().invoke(cli, ["validate", str(data), "--no-tokens", "--set", "lora_r=8"])
    assert good.exit_code == 0, good.output


def test_drop_sends_the_sidecar_and_a_pair_test_half_first(storage_env, tmp_path):
    from shared.storage import default_storage

    folder = tmp_path / "may"
    folder.mkdir()
    (folder / "train.jsonl").write_text(_rows(12))
    (folder / "test.jsonl.gz").write_bytes(__import__("gzip").compress(_rows(2).encode()))
    (folder / "train.jsonl.tunedrop.json").write_text('{"num_train_epochs": 1}')
    result = CliRunner().invoke(cli, ["drop", str(folder / "test.jsonl.gz"), "--set", "max_steps=2"])
    assert result.exit_code == 0, result.output
    order = [line.split(" as ")[1].rstrip(".").split("/", 1)[1] for line in result.output.splitlines()
             if line.startswith("Dropped")]
    assert order == ["may/train.jsonl.tunedrop.json", "may/test.jsonl.gz", "may/train.jsonl"]
    container = default_storage().blob_service.get_container_client(storage_env["TUNEDROP_TRAINING_CONTAINER"])
    train = container.get_blob_client("may/train.jsonl").get_blob_properties()
    assert train.metadata == {"tunedrop_max_steps": "2"}
    assert "Run id: may-" in result.output  # a folder pair's run is named after its folder


def test_secret_makes_a_usable_standard_webhooks_secret():
    secret = CliRunner().invoke(cli, ["secret"]).output.strip()
    assert secret.startswith("whsec_")
    Webhook(secret)  # the reference implementation accepts it


def test_status_without_a_running_host_says_how_to_start_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEDROP_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("TUNEDROP_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1 and "tunedrop up" in result.output


def test_drop_without_local_storage_says_how_to_start_it_at_once(monkeypatch, tmp_path):
    """No `tunedrop up` running (nothing on Azurite's port): a message naming the fix, not a minute of retries
    ending in a traceback."""
    import socket

    import tunedrop.azurite

    for key in [k for k in os.environ if k.startswith("TUNEDROP_STORAGE")]:
        monkeypatch.delenv(key)
    # `drop` sets TUNEDROP_STORAGE to Azurite's itself: recorded here so that it is taken away again after the test
    # (a later test's `tunedrop demo` subprocess would inherit it and use port 10000)
    monkeypatch.setenv("TUNEDROP_STORAGE", "")
    monkeypatch.delenv("TUNEDROP_STORAGE")
    with socket.socket() as free:  # a port nothing listens on stands in for Azurite's 10000
        free.bind(("127.0.0.1", 0))
        closed = free.getsockname()[1]
    really_open = tunedrop.azurite.port_open
    monkeypatch.setattr(tunedrop.azurite, "port_open", lambda port, host="127.0.0.1": really_open(closed, host))
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("{}\n")
    result = CliRunner().invoke(cli, ["drop", str(dataset)])
    assert result.exit_code == 1 and "start the app first with `tunedrop up`" in result.output
    assert "Traceback" not in result.output


def test_readme_tables_match_the_code():
    text = README.read_text()
    assert render(text, blocks()) == text, "README is out of date: run `python -m tunedrop.readme`"
    assert "TUNEDROP_IDLE_MINUTES" in text and "learning_rate" in text


def test_post_receiver_passes_path_lowercased_headers_and_body_and_answers_500_on_a_crash():
    import urllib.error
    import urllib.request

    from tunedrop.receiver import PostReceiver

    seen = []

    def handle(path, headers, body):
        seen.append((path, headers.get("x-mixed-case"), body))
        if body == b"boom":
            raise RuntimeError("handler bug")
        return 202

    with PostReceiver(handle, "/in?x=1") as receiver:
        def post(body):
            request = urllib.request.Request(receiver.url, data=body, headers={"X-Mixed-Case": "yes"})
            try:
                return urllib.request.urlopen(request, timeout=10).status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert (post(b"hello"), post(b"boom")) == (202, 500)
    assert seen == [("/in?x=1", "yes", b"hello"), ("/in?x=1", "yes", b"boom")]

