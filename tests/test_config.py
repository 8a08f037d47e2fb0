"""Settings from the environment, training parameters and their overrides, run event parsing."""

import pytest

from shared.events import RUN_COMPLETED, RUN_ID_TAG, RunEvent, run_event
from shared.settings import Settings, SettingsError
from shared.training import TrainingConfig, TrainingConfigError


def test_settings_defaults_and_types_from_environment():
    settings = Settings.from_env({"TUNEDROP_IDLE_MINUTES": "0.5", "TUNEDROP_MIN_EXAMPLES": "3",
                                  "TUNEDROP_WEBHOOK_URLS": "http://a/x, http://b/y",
                                  "TUNEDROP_WEBHOOK_SECRET": "whsec_AAAA"})
    assert settings.idle_minutes == 0.5 and settings.min_examples == 3
    assert settings.webhook_urls == ("http://a/x", "http://b/y")
    assert settings.effective_base_model == "smollm2-135m-instruct"
    assert settings.effective_model_name == "smollm2-135m-instruct-ultrachat-200k"
    assert Settings.from_env({"TUNEDROP_BACKEND": "azureml"}).effective_base_model == "Phi-3-mini-4k-instruct"


@pytest.mark.parametrize("text", ["1", "true", "YES", " on ", "0", "False", "no", "OFF", "maybe", "2", "", "tru"])
def test_a_setting_a_training_parameter_and_the_force_flag_read_a_boolean_alike(text):
    """One coercion (shared/coerce.py): what one reads as true the others do; what one refuses all refuse."""
    from shared.intake import forced

    outcomes = []
    for read in (lambda: Settings.from_env({"TUNEDROP_COUNT_TOKENS": text}).count_tokens,
                 lambda: TrainingConfig().with_overrides({"apply_lora": text}).apply_lora,
                 lambda: forced({"tunedrop_force": text})):
        try:
            outcomes.append(read())
        except (SettingsError, TrainingConfigError) as exc:
            assert repr(text) in str(exc)
            outcomes.append("refused")
    if text == "":  # an empty setting means "the default"; an empty override is refused
        assert outcomes == [True, "refused", "refused"]
    else:
        assert len(set(outcomes)) == 1, outcomes
        assert outcomes[0] == {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False,
                               "no": False, "off": False}.get(text.strip().lower(), "refused")


@pytest.mark.parametrize("value, ok", [("7", 7), (7.0, 7), ("7.5", None), (7.5, None), (True, None), ("nan", None)])
def test_numbers_are_read_alike_too(value, ok):
    from shared.coerce import to_int

    try:
        got = to_int(value)
    except ValueError:
        got = None
    assert got == ok
    if isinstance(value, str):
        try:
            setting = Settings.from_env({"TUNEDROP_MIN_EXAMPLES": value}).min_examples
        except SettingsError:
            setting = None
        assert setting == ok


@pytest.mark.parametrize("env, message", [
    ({"TUNEDROP_MIN_EXAMPLES": "ten"}, "TUNEDROP_MIN_EXAMPLES='ten' is not a valid int"),
    ({"TUNEDROP_COUNT_TOKENS": "maybe"}, "TUNEDROP_COUNT_TOKENS='maybe' is not a valid bool"),
    ({"TUNEDROP_BACKEND": "sagemaker"}, "use 'local' or 'azureml'"),
    ({"TUNEDROP_WEBHOOK_URLS": "http://a"}, "TUNEDROP_WEBHOOK_SECRET"),
])
def test_bad_settings_name_the_setting(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_training_defaults_are_the_seeds():
    config = TrainingConfig()
    assert (config.num_train_epochs, config.per_device_train_batch_size, config.per_device_eval_batch_size,
            config.learning_rate, config.lr_scheduler_type) == (3, 1, 1, 5e-6, "cosine")
    assert (config.apply_lora, config.apply_deepspeed, config.deepspeed_stage) == (True, True, 2)


def test_display_name_is_built_as_the_seed_builds_it():
    config = TrainingConfig(max_seq_length=2048)
    assert config.display_name("Phi-3-mini-4k-instruct") == (
        "Phi-3-mini-4k-instruct-ultrachat-bs1-cosine-ds2-lora-save_limit1-seqlen2048")
    plain = TrainingConfig(apply_deepspeed=False, apply_lora=False)
    assert plain.display_name("m") == "m-ultrachat-bs1-cosine-nods-nolora-save_limit1-seqlen512"


def test_overrides_coerce_strings_from_blob_metadata():
    config = TrainingConfig().with_overrides({"num_train_epochs": "1", "learning_rate": "1e-4", "apply_lora": "false"})
    assert (config.num_train_epochs, config.learning_rate, config.apply_lora) == (1, 1e-4, False)


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": 1}, "unknown training parameter 'epochs'"),
    ({"num_train_epochs": "many"}, "num_train_epochs must be a int"),
    ({"num_train_epochs": 0}, "num_train_epochs must be > 0"),
    ({"learning_rate": 3}, "learning_rate must be in"),
    ({"lr_scheduler_type": "wobbly"}, "use cosine, linear or constant"),
    ({"apply_lora": "maybe"}, "apply_lora must be a bool"),
    ({"max_steps": -1}, "max_steps must be >= 0"),  # it made the training estimate negative: no limit held it
    ({"max_seq_length": 10**20}, "max_seq_length must be at most 131,072"),
])
def test_bad_overrides_are_refused_by_name(overrides, message):
    with pytest.raises(TrainingConfigError, match=message):
        TrainingConfig().with_overrides(overrides, "blob metadata")


def test_run_event_round_trip_and_case_insensitive_keys():
    raw = run_event(status="Completed", topic="/ws", job_name="job-1", experiment_name="exp",
                    run_tags={RUN_ID_TAG: "run-1"})
    assert raw["eventType"] == RUN_COMPLETED and raw["subject"].endswith("/runs/job-1")
    event = RunEvent(id=raw["id"], event_type=raw["eventType"], topic=raw["topic"], subject=raw["subject"],
                     data={"RunId": "job-1", "RunTags": {"TUNEDROP_RUN_ID": "run-1"}, "RunType": None})
    assert (event.run_id, event.tunedrop_run_id, event.run_status, event.is_terminal) == ("job-1", "run-1", "Completed", True)
    failed = RunEvent(id="1", event_type="Microsoft.MachineLearningServices.RunStatusChanged", topic="/ws",
                      subject="experiments/e/runs/job-2", data={"runStatus": "Failed"})
    assert (failed.run_id, failed.run_status, failed.tunedrop_run_id) == ("job-2", "Failed", "")


def test_tunedrop_up_sweeps_every_ten_seconds_unless_told_otherwise(tmp_path):
    """A local endpoint is ready in seconds: the 5-minute Azure sweep would leave it 'deploying' that long."""
    from tunedrop.host.timer import Schedule
    from tunedrop.local import embedded_environment

    env = embedded_environment("UseDevelopmentStorage=true", state_dir=tmp_path, base={})
    assert Schedule(env["TUNEDROP_SWEEP_SCHEDULE"]).period_s() == 10
    assert Settings().sweep_schedule == "0 */5 * * * *"  # Azure keeps its own
    mine = embedded_environment("UseDevelopmentStorage=true", state_dir=tmp_path,
                                base={"TUNEDROP_SWEEP_SCHEDULE": "*/30 * * * * *"})
    assert mine["TUNEDROP_SWEEP_SCHEDULE"] == "*/30 * * * * *"
