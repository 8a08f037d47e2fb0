"""The local fine-tune job, run for real as a subprocess on tiny-random."""

from __future__ import annotations

import json
import math
import re

import pytest

from shared.backends.local.examples import IGNORE_INDEX, encode_conversation, parse_dataset
from shared.backends.local.models import TINY_RANDOM, resolve_base_model
from shared.backends.local.steps import lr_factor
from shared.backends.local.workers import plan
from shared.events import RUN_COMPLETED, RUN_ID_TAG, RUN_STATUS_CHANGED, RunEvent
from shared.split import split_examples
from shared.training import TrainingConfig
from tests.local.conftest import EventRecorder, conversations, dataset_bytes, run_trainer, upload, write_job


def expected_split(job):
    """The split shared/split.py gives the trained dataset (both backends split alike)."""
    config = TrainingConfig().with_overrides(job["config"])
    return split_examples(conversations(), config.test_fraction, config.seed)


def test_training_run_completes_and_reports_like_azure_ml(trained_run):
    status, job = trained_run["status"], trained_run["job"]
    assert status["state"] == "Completed", trained_run["log"]
    metrics = status["metrics"]
    train, test = expected_split(job)
    assert metrics["train_examples"] == len(train) and metrics["test_examples"] == len(test) > 0
    assert metrics["train_steps"] == 2 * len(train)  # batch 1, 2 epochs
    assert metrics["train_tokens_per_second"] > 0 and metrics["train_runtime_s"] > 0
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_loss"] < metrics["eval_loss_initial"]  # it learned something

    events = trained_run["events"]
    assert [e["eventType"] for e in events] == [RUN_STATUS_CHANGED, RUN_COMPLETED]
    assert all(p["headers"].get("aeg-event-type") == "Notification" for p in trained_run["posts"])
    running, completed = (RunEvent(e["id"], e["eventType"], e["topic"], e["subject"], e["data"]) for e in events)
    assert running.run_status == "Running" and completed.run_status == "Completed"
    for event in (running, completed):
        assert event.tunedrop_run_id == job["run_id"]
        assert event.run_id == job["job_name"]
        assert event.experiment_name == job["experiment_name"]
        assert event.topic == job["workspace_id"]
    assert completed.run_properties == {"mlflow_run_id": status["mlflow_run_id"]}


def test_training_run_is_logged_to_mlflow(trained_run):
    from mlflow import MlflowClient

    status, job = trained_run["status"], trained_run["job"]
    client = MlflowClient(job["tracking_uri"])
    run = client.get_run(status["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[RUN_ID_TAG] == job["run_id"] and run.data.tags["job_name"] == job["job_name"]
    assert run.data.params["learning_rate"] == "0.005" and run.data.params["lora_r"] == "8"
    assert run.data.params["base_model"] == TINY_RANDOM
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 2 * len(expected_split(job)[0]) + 1))
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "learning_rate")]
    assert lrs[0] == pytest.approx(5e-3) and lrs[-1] < lrs[0] / 10  # cosine decay
    for name in ("eval_loss", "eval_loss_initial", "train_tokens_per_second", "train_runtime_s",
                 "train_examples", "test_examples"):
        assert name in run.data.metrics, name

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tunedrop_model.json", "MLmodel"):
        assert f"model/{name}" in artifacts
    local = client.download_artifacts(run.info.run_id, "model/tunedrop_model.json", str(trained_run["job_dir"] / "dl"))
    assert json.loads(open(local).read()) == {"base_model": TINY_RANDOM, "adapter": True}
    adapter = json.loads((trained_run["job_dir"] / "model" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "mlartifacts" in run.info.artifact_uri  # beside the database, not ./mlruns


def test_missing_dataset_fails_with_a_failed_event(storage_env, model_cache, tmp_path):
    connection = storage_env["TUNEDROP_STORAGE"]
    container = storage_env["TUNEDROP_TRAINING_CONTAINER"]
    upload(connection, container, "other.jsonl", b"{}\n")
    recorder = EventRecorder()
    job_dir = tmp_path / "job"
    job = write_job(job_dir, container=container, blob="missing.jsonl", etag=None,
                    model_cache=model_cache, events_url=recorder.url)
    try:
        result = run_trainer(job_dir, connection)
    finally:
        recorder.close()
    assert result.returncode == 1
    status = json.loads((job_dir / "status.json").read_text())
    assert status["state"] == "Failed"
    assert "BlobNotFound" in status["error"] or "does not exist" in status["error"]
    assert "\n" not in status["error"]
    assert "Traceback" in (job_dir / "train.log").read_text()
    events = recorder.events
    assert [(e["eventType"], e["data"].get("runStatus")) for e in events] == [
        (RUN_STATUS_CHANGED, "Running"), (RUN_STATUS_CHANGED, "Failed")]
    assert all(e["data"]["runTags"] == {RUN_ID_TAG: job["run_id"]} for e in events)


def test_unreachable_events_url_does_not_fail_the_job(storage_env, model_cache, tmp_path):
    from tunedrop.azurite import free_port

    connection = storage_env["TUNEDROP_STORAGE"]
    container = storage_env["TUNEDROP_TRAINING_CONTAINER"]
    etag = upload(connection, container, "tiny.jsonl",
                  b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                  b'{"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "hey"}]}\n')
    job_dir = tmp_path / "job"
    write_job(job_dir, container=container, blob="tiny.jsonl", etag=etag, model_cache=model_cache,
              events_url=f"http://127.0.0.1:{free_port()}/nobody",
              config={"max_steps": 1, "apply_lora": False, "max_seq_length": 64})
    job = json.loads((job_dir / "job.json").read_text())
    (job_dir / "job.json").write_text(json.dumps({**job, "events_attempts": 2}))  # retries, but briefly
    result = run_trainer(job_dir, connection)
    status = json.loads((job_dir / "status.json").read_text())
    assert result.returncode == 0, (job_dir / "train.log").read_text()
    assert status["state"] == "Completed"
    assert status["metrics"]["train_steps"] == 1 and status["metrics"]["test_examples"] == 1
    assert (job_dir / "model" / "model.safetensors").is_file()  # no LoRA: full weights
    assert json.loads((job_dir / "model" / "tunedrop_model.json").read_text())["adapter"] is False
    assert "event not delivered after 2 tries" in (job_dir / "train.log").read_text()


def test_labels_cover_exactly_the_assistant_replies(model_cache):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(TINY_RANDOM, model_cache))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "And 4 plus 4?"},
        {"role": "assistant", "content": "It is 8."},
    ]
    ids, labels = encode_conversation(tokenizer, messages, max_length=512)
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    # contiguous labelled runs, decoded: each reply followed by its end-of-turn token
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tokenizer.decode(run) for run in runs] == ["2 plus 3 is 5.<|im_end|>", "It is 8.<|im_end|>"]
    expected = tokenizer(["2 plus 3 is 5.", "It is 8."], add_special_tokens=False)["input_ids"]
    assert runs == [expected[0] + [tokenizer.eos_token_id], expected[1] + [tokenizer.eos_token_id]]

    truncated = encode_conversation(tokenizer, messages, max_length=40)
    assert len(truncated[0]) == 40
    assert encode_conversation(tokenizer, messages[:2], max_length=512) is None  # nothing to learn


def test_parse_tolerates_bom_crlf_blank_lines_and_extra_keys(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        "\ufeff{\"prompt\": \"p\", \"prompt_id\": \"1\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}, "
        "{\"role\": \"assistant\", \"content\": \"b\"}]}\r\n\r\n   \r\n"
        "{\"messages\": [{\"role\": \"user\", \"content\": \"c\"}, {\"role\": \"assistant\", \"content\": \"d\"}]}\r\n"
        .encode()
    )
    assert parse_dataset(path) == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    ]


def test_split_is_deterministic_and_keeps_a_test_example():
    rows = list(range(20))
    train, test = split_examples(rows, 0.1, seed=42)
    assert (train, test) == split_examples(rows, 0.1, seed=42)
    assert 0 < len(test) < 10 and sorted(train + test) == rows  # ~10 %: a hash per example (shared/split.py)
    assert split_examples(rows, 0.1, seed=7) != (train, test)
    assert len(split_examples([1, 2], 0.01, seed=1)[1]) == 1
    assert split_examples([1], 0.5, seed=1) == ([1], [])


def test_schedules():
    assert lr_factor("constant", 5, 10) == 1.0
    assert lr_factor("linear", 0, 10) == 1.0 and lr_factor("linear", 5, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 9, 10) < 0.05


# -- bounded evaluation and the dataset limits (issue 15) ------------------------------------------------------


def test_evaluation_is_a_capped_seeded_sample_logged_as_params(storage_env, model_cache, tmp_path):
    """A large held-out split with max_steps=2: a sample of max_eval_examples is evaluated, a few training
    examples tokenised, and the run says so (it used to tokenise and evaluate the whole split). Its steps of 2
    examples run on job.json's "workers" 2 (TUNEDROP_LOCAL_TRAIN_WORKERS), which the run reports too; that two
    workers compute what one does is tests/local/test_workers.py's, on the same model in one process."""
    from mlflow import MlflowClient

    connection = storage_env["TUNEDROP_STORAGE"]
    container = storage_env["TUNEDROP_TRAINING_CONTAINER"]
    rows = conversations(400)
    etag = upload(connection, container, "many.jsonl", dataset_bytes(rows))
    job_dir = tmp_path / "job"
    config = {"max_steps": 2, "test_fraction": 0.5, "max_seq_length": 64, "lora_r": 4, "lora_alpha": 8,
              "gradient_accumulation_steps": 2}
    job = write_job(job_dir, container=container, blob="many.jsonl", etag=etag, model_cache=model_cache,
                    events_url=None, config=config)
    (job_dir / "job.json").write_text(json.dumps({**job, "limits": {"max_eval_examples": 5}, "workers": 2}))
    result = run_trainer(job_dir, connection)
    log = (job_dir / "train.log").read_text()
    assert result.returncode == 0, log
    held_out = len(split_examples(rows, 0.5, 42)[1])
    status = json.loads((job_dir / "status.json").read_text())
    metrics = status["metrics"]
    assert metrics["test_examples"] == held_out > 150 and metrics["eval_examples"] == 5
    assert metrics["train_steps"] == 2
    assert f"evaluating a seeded sample of 5 of the {held_out} held-out examples" in log
    params = MlflowClient(job["tracking_uri"]).get_run(status["mlflow_run_id"]).data.params
    assert (params["eval_examples"], params["eval_sampled"], params["max_eval_examples"]) == ("5", "True", "5")
    assert params["test_examples"] == str(held_out)
    # 2 steps of 2 examples need 4; a quarter more and 8 spares are tokenised, not the ~200 of the train split
    assert int(params["train_examples_tokenised"]) <= 13 < int(params["train_examples"])
    planned = plan(2, 2)  # (workers, threads each) on this machine's cores: (2, 1) on two
    assert (int(params["workers"]), int(params["threads_per_worker"])) == planned
    assert f"{planned[0]} worker(s) x {planned[1]} thread(s)" in log and len(re.findall(r"step \d+/2 loss", log)) == 2


def test_the_job_reads_the_sample_the_azure_split_writer_writes_and_no_more_than_the_limits(storage_env, tmp_path):
    """In process, no model: the local job's evaluated examples are eval_sample() of the held-out split, which
    tests/test_dataset_limits.py finds in the Azure ML test file; past a dataset limit it stops reading."""
    from shared.backends.local.job_data import job_limits, load_data
    from shared.backends.local.trainer import Job
    from shared.datasets import DatasetLimitError
    from shared.split import eval_sample

    connection = storage_env["TUNEDROP_STORAGE"]
    container = storage_env["TUNEDROP_TRAINING_CONTAINER"]
    rows = conversations(120)
    etag = upload(connection, container, "c.jsonl", dataset_bytes(rows))
    job_dir = tmp_path / "job"
    write_job(job_dir, container=container, blob="c.jsonl", etag=etag, model_cache=tmp_path, events_url=None,
              config={"test_fraction": 0.4, "seed": 3})
    job = Job(job_dir)
    config = TrainingConfig().with_overrides(job.spec["config"])
    limits = {**job_limits(job.spec), "max_eval_examples": 7}  # the settings of the environment, but for the cap
    data = load_data(job.spec, job.dir, config, limits)
    train, test = split_examples([r["messages"] for r in rows], 0.4, 3)
    assert data.train == train and data.held_out == len(test) > 7
    assert data.evaluated == eval_sample(test, 7, 3) and data.eval_sampled
    with pytest.raises(DatasetLimitError) as caught:
        load_data(job.spec, job.dir, config, {**limits, "max_examples": 50})
    assert caught.value.code == "too_many_examples" and "TUNEDROP_MAX_EXAMPLES" in str(caught.value)


def test_a_finished_job_leaves_this_machines_throughput_and_the_next_estimate_uses_it(trained_run, model_cache, tmp_path):
    from shared.datasets import check_dataset
    from shared.settings import Settings
    from shared.throughput import measured

    figures = measured(model_cache, "tiny-random")  # the session's cache: this job's figure, or averaged with others'
    assert re.search(r"throughput here: \d+ tokens/s, \d+ s overhead", trained_run["log"])
    assert figures and figures["runs"] >= 1 and figures["tokens_per_s"] > 0 and figures["overhead_s"] >= 0
    settings = Settings(backend="local", base_model="tiny-random", model_cache_dir=model_cache, state_dir=tmp_path)
    report, _ = check_dataset(settings, ("sums.jsonl", iter([dataset_bytes(conversations())])))
    estimate = report.stats["training"]
    assert estimate["source"] == "measured" and estimate["tokens_per_s"] == pytest.approx(figures["tokens_per_s"], rel=0.01)
    assert estimate["estimated_seconds"] == pytest.approx(
        estimate["training_tokens"] / estimate["tokens_per_s"] + estimate["overhead_s"], abs=0.2)
    assert "measured on this machine" in estimate["note"] and "measured here" in report.summary()


def test_a_throughput_far_from_the_cached_one_replaces_it_and_a_near_one_is_averaged_in(tmp_path):
    from shared.throughput import measured, record

    assert measured(tmp_path, "m") is None
    record(tmp_path, "m", 100.0, 10.0)
    assert record(tmp_path, "m", 120.0, 14.0) == {**measured(tmp_path, "m"), "tokens_per_s": 110.0, "overhead_s": 12.0,
                                                  "runs": 2}
    assert record(tmp_path, "m", 300.0, 5.0)["runs"] == 1  # 2.7x: another machine, or other threads
    assert measured(tmp_path, "m")["tokens_per_s"] == 300.0
    (tmp_path / "throughput.json").write_text("{not json")
    assert measured(tmp_path, "m") is None  # broken: not measured, never an error


@pytest.mark.parametrize("recorded", [True, False])
def test_a_benchmark_job_leaves_the_users_throughput_as_it_was(tmp_path, recorded):
    import json

    from shared.backends.local.trainer import Job
    from shared.throughput import measured

    spec = {"base_model": "m", "model_cache_dir": str(tmp_path), **({} if recorded else {"record_throughput": False})}
    (tmp_path / "job.json").write_text(json.dumps(spec))
    job = Job(tmp_path)
    job.counted_tokens = 2000
    job._record_throughput({"train_runtime_s": 10.0})
    assert (measured(tmp_path, "m") is not None) == recorded
    if recorded:
        assert measured(tmp_path, "m")["tokens_per_s"] == 200.0

