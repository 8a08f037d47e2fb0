"""infra/ against the code, without the Bicep CLI or Azure: plain parsing of the .bicep text.

- every setting shared/settings.py reads is set in the Function App's app settings, and the Bicep
  sets no tunedrop setting the code does not read (read at test time, so settings added to
  shared/settings.py must be added to infra/modules/functionapp.bicep too);
- literal values there equal the code's defaults, except the few that differ in Azure on purpose;
- the Event Grid filters deliver exactly the events job_events and the pipeline act on;
- identity-based connections only: no connection strings, keys or FUNCTIONS_WORKER_RUNTIME.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from shared import events
from shared.settings import BINDING_SETTINGS, STORAGE_CONNECTION, Settings, describe
from shared.status import ACTIVE

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
FUNCTION_APP = INFRA / "modules" / "functionapp.bicep"
EVENTGRID = INFRA / "eventgrid.bicep"
WORKSPACE_SUBSCRIPTIONS = INFRA / "modules" / "workspace-subscriptions.bicep"

#: Settings whose Azure value differs from the code's default on purpose.
AZURE_VALUES = {
    "TUNEDROP_BACKEND": "azureml",  # the production path
    "TUNEDROP_STATE_DIR": "/tmp/tunedrop",  # the only writable place on Flex Consumption
    "TUNEDROP_MODEL_CACHE": "/tmp/tunedrop/models",
    "TUNEDROP_EVENTS_URL": "",  # local backend only: Azure ML publishes to Event Grid itself
}


def _object(text: str, name: str) -> dict[str, str]:
    """``var NAME = { KEY: VALUE ... }`` -> {KEY: VALUE text}, one entry a line."""
    match = re.search(rf"^var {name} = \{{\n(.*?)^\}}", text, re.S | re.M)
    assert match, f"no `var {name} = {{...}}` in the Bicep"
    entries = {}
    for line in match.group(1).splitlines():
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        key, sep, value = line.partition(":")
        assert sep, f"cannot read {line!r}"
        entries[key.strip().strip("'")] = value.strip()
    return entries


def _literal(value: str) -> str | None:
    """The string a Bicep literal stands for, or None for an expression."""
    match = re.fullmatch(r"'((?:[^'\\$]|\\.)*)'", value)
    return match.group(1) if match else None


@pytest.fixture(scope="module")
def app_settings() -> dict[str, str]:
    return _object(FUNCTION_APP.read_text(), "tunedropSettings")


@pytest.fixture(scope="module")
def platform_settings() -> dict[str, str]:
    return _object(FUNCTION_APP.read_text(), "platformSettings")


def code_settings() -> dict[str, str]:
    """environment variable -> default, for every setting the code reads (STORAGE_CONNECTION apart)."""
    return {env: default for env, default, _ in describe() if env != STORAGE_CONNECTION}


def test_every_setting_the_code_reads_is_set_in_the_bicep(app_settings):
    missing = sorted(set(code_settings()) - set(app_settings))
    assert not missing, f"set these in `tunedropSettings` in {FUNCTION_APP.relative_to(ROOT)}: {missing}"


def test_the_bicep_sets_no_tunedrop_setting_the_code_does_not_read(app_settings):
    known = set(code_settings())
    unknown = sorted(k for k in app_settings if k not in known and not k.startswith(f"{STORAGE_CONNECTION}__"))
    assert not unknown, f"not read by shared/settings.py: {unknown}"
    # every field is covered by describe(), so the test follows new settings
    assert {f.metadata["env"] for f in fields(Settings)} <= known


def test_storage_connection_is_identity_based(app_settings, platform_settings):
    for kind in ("blob", "queue", "table"):
        assert f"{STORAGE_CONNECTION}__{kind}ServiceUri" in app_settings
    assert _literal(app_settings[f"{STORAGE_CONNECTION}__credential"]) == "managedidentity"
    assert f"{STORAGE_CONNECTION}__clientId" in app_settings
    assert STORAGE_CONNECTION not in app_settings  # a connection string would go there
    assert _literal(platform_settings["AzureWebJobsStorage__credential"]) == "managedidentity"
    assert "AzureWebJobsStorage__accountName" in platform_settings
    assert "AzureWebJobsStorage" not in platform_settings


def test_literal_values_are_the_code_defaults_or_chosen_for_azure(app_settings):
    defaults = code_settings()
    for env, value in app_settings.items():
        literal = _literal(value)
        if literal is None or env not in defaults:
            continue
        expected = AZURE_VALUES.get(env, defaults[env])
        # an empty value means "the code's default" (Settings.from_env skips empty values)
        assert literal in (expected, ""), f"{env}: Bicep sets {literal!r}, expected {expected!r}"
        if literal == "" and env not in AZURE_VALUES:
            assert Settings.from_env({env: ""}) == Settings()
    for env, value in AZURE_VALUES.items():
        assert _literal(app_settings[env]) == value


def test_binding_settings_are_never_empty(app_settings):
    """The host resolves %SETTING% in bindings; an empty one breaks indexing."""
    by_name = {f.name: f.metadata["env"] for f in fields(Settings)}
    for name in BINDING_SETTINGS:
        value = app_settings[by_name[name]]
        assert _literal(value) != "", f"{by_name[name]} must have a value"


def test_names_the_bicep_creates_are_the_code_defaults():
    main = (INFRA / "main.bicep").read_text()
    defaults = Settings()
    for var, expected in (("trainingContainer", defaults.training_container),
                          ("quarantineContainer", defaults.quarantine_container),
                          ("runsTable", defaults.runs_table), ("webhookQueue", defaults.webhook_queue),
                          ("jobEventsQueue", defaults.job_events_queue),
                          ("datastoreName", defaults.azureml_datastore),
                          ("dataContainer", defaults.azureml_data_container)):
        assert re.search(rf"^var {var} = '{re.escape(expected)}'$", main, re.M), var
    assert f"param sweepSchedule string = '{defaults.sweep_schedule}'" in main


def test_the_webhook_secret_comes_from_key_vault(app_settings):
    value = app_settings["TUNEDROP_WEBHOOK_SECRET"]
    assert "@Microsoft.KeyVault(SecretUri=" in value and "whsec_" not in value
    assert "@secure()" in (INFRA / "main.bicep").read_text().split("param webhookSecret")[0][-200:]


def test_no_keys_connection_strings_or_deprecated_flex_settings():
    for path in INFRA.rglob("*.bicep"):
        text = "\n".join(line for line in path.read_text().splitlines() if not line.strip().startswith("//"))
        for bad in ("AccountKey=", "listKeys(", "FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION",
                    "WEBSITE_RUN_FROM_PACKAGE", "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING", "InstrumentationKey="):
            if bad == "listKeys(" and path == EVENTGRID:
                continue  # the blob extension's system key, passed straight to Event Grid
            assert bad not in text, f"{bad} in {path.relative_to(ROOT)}"
    storage = (INFRA / "modules" / "storage.bicep").read_text()
    assert "allowSharedKeyAccess: false" in storage and "minimumTlsVersion: 'TLS1_2'" in storage
    assert "allowBlobPublicAccess: false" in storage


def test_flex_consumption_python_311():
    text = FUNCTION_APP.read_text()
    assert "kind: 'functionapp,linux'" in text
    assert "sku: { name: 'FC1', tier: 'FlexConsumption' }" in text
    version = re.search(r"runtime: \{ name: 'python', version: '(\d+)\.(\d+)' \}", text)
    assert version and (int(version.group(1)), int(version.group(2))) >= (3, 11)


# ---- Event Grid ---------------------------------------------------------------------------------

def _subscriptions(text: str) -> dict[str, str]:
    """resource symbolic name -> its body, for every event subscription in the file."""
    found = {}
    for match in re.finditer(r"^resource (\w+) 'Microsoft\.EventGrid/systemTopics/eventSubscriptions@[^']+' = \{\n(.*?)^\}",
                             text, re.S | re.M):
        found[match.group(1)] = match.group(2)
    return found


def _strings(body: str, key: str) -> list[str]:
    match = re.search(rf"{key}: \[([^\]]*)\]", body)
    return re.findall(r"'([^']*)'", match.group(1)) if match else []


def test_blob_subscription_feeds_the_ingest_blob_trigger():
    (body,) = _subscriptions(EVENTGRID.read_text()).values()
    assert _strings(body, "includedEventTypes") == ["Microsoft.Storage.BlobCreated"]
    assert "subjectBeginsWith: '/blobServices/default/containers/${trainingContainer}/blobs/'" in body
    assert "/runtime/webhooks/blobs?functionName=Host.Functions.ingest&code=" in body
    assert "systemKeys.blobs_extension" in body
    assert f"param trainingContainer string = '{Settings().training_container}'" in EVENTGRID.read_text()
    from functions import ingest
    assert ingest.ingest._function.get_function_name() == "ingest"  # the name the webhook URL uses


def test_run_event_subscriptions_match_what_job_events_handles():
    subs = _subscriptions(WORKSPACE_SUBSCRIPTIONS.read_text())
    types = sorted(t for body in subs.values() for t in _strings(body, "includedEventTypes"))
    assert types == sorted(events.RUN_EVENT_TYPES)
    text = WORKSPACE_SUBSCRIPTIONS.read_text()
    assert "endpointType: 'AzureFunction'" in text and "resourceId: functionResourceId" in text
    for body in subs.values():
        assert "destination: destination" in body
    assert "'${site.id}/functions/job_events'" in EVENTGRID.read_text()

    completed = [b for b in subs.values() if events.RUN_COMPLETED in b]
    assert len(completed) == 1 and "advancedFilters" not in completed[0], \
        "RunCompleted has no runStatus: a runStatus filter would drop it"

    (changed,) = [b for b in subs.values() if events.RUN_STATUS_CHANGED in b]
    assert "key: 'data.runStatus'" in changed and "operatorType: 'StringIn'" in changed
    statuses = set(_strings(changed, "values"))
    failures = set(events.TERMINAL_STATUSES) - {"Completed"}
    # every failure the pipeline handles is delivered; Running too (run.running); nothing it ignores
    assert failures <= statuses
    assert statuses - failures == {"Running"} and "Running" in ACTIVE


@pytest.mark.parametrize("status", ["Completed", "Running", "Failed", "Canceled"])
def test_each_delivered_event_parses_to_a_status_the_pipeline_acts_on(status):
    raw = events.run_event(status=status, topic="/subscriptions/x/workspaces/w", job_name="job",
                           experiment_name="exp", run_tags={events.RUN_ID_TAG: "run-1"})
    assert raw["eventType"] in _strings(WORKSPACE_SUBSCRIPTIONS.read_text(), "includedEventTypes") or \
        raw["eventType"] in events.RUN_EVENT_TYPES

    class FuncEvent:  # the attributes RunEvent.from_function_event reads from func.EventGridEvent
        id, topic, subject, event_type = raw["id"], raw["topic"], raw["subject"], raw["eventType"]

        def get_json(self):
            return raw["data"]

    event = events.RunEvent.from_function_event(FuncEvent())
    assert event.is_run_event and event.run_status == status and event.tunedrop_run_id == "run-1"
    assert status in ACTIVE or status in events.TERMINAL_STATUSES


def test_every_subscription_retries_and_dead_letters():
    bodies = [*_subscriptions(EVENTGRID.read_text()).values(), *_subscriptions(WORKSPACE_SUBSCRIPTIONS.read_text()).values()]
    assert len(bodies) == 3
    for body in bodies:
        assert "retryPolicy: retryPolicy" in body and "deadLetterWithResourceIdentity: deadLetter" in body
    text = EVENTGRID.read_text()
    assert "endpointType: 'StorageBlob'" in text and "identity: { type: 'SystemAssigned' }" in text


# ---- azd ---------------------------------------------------------------------------------------

def test_azure_yaml_deploys_the_function_app_and_runs_the_event_grid_hook():
    text = (ROOT / "azure.yaml").read_text()
    assert re.search(r"^services:\n  api:\n    project: \.\n    language: python\n    host: function$", text, re.M)
    assert "./infra/scripts/postdeploy.sh" in text
    hook = (INFRA / "scripts" / "postdeploy.sh").read_text()
    assert "infra/eventgrid.bicep" in hook
    main = (INFRA / "main.bicep").read_text()
    outputs = set(re.findall(r"^output (\w+) ", main, re.M))
    used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", hook)) - {"AZURE_RESOURCE_GROUP"}
    assert used <= outputs, f"the hook reads values main.bicep does not output: {sorted(used - outputs)}"
    assert "'azd-service-name': 'api'" in FUNCTION_APP.read_text()


def test_parameters_file_names_only_real_parameters():
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    declared = set(re.findall(r"^param (\w+) ", (INFRA / "main.bicep").read_text(), re.M))
    assert set(params) <= declared


def test_every_parameter_has_a_description():
    for path in INFRA.glob("*.bicep"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("param "):
                above = "\n".join(lines[max(0, i - 4):i])
                assert "@description(" in above, f"{path.name}: {line} has no @description"


def test_funcignore_keeps_the_app_and_drops_the_rest():
    ignored = set((ROOT / ".funcignore").read_text().split())
    assert {"tests", ".venv", "node_modules", ".tunedrop", "bench", "infra"} <= ignored
    assert not {"shared", "functions", "function_app.py", "host.json", "requirements.txt"} & ignored


# ---- the datastore the jobs read through ----------------------------------------------------------

def test_every_workspace_gets_the_credential_less_datastore_on_the_data_container():
    main = (INFRA / "main.bicep").read_text()
    (module,) = re.findall(r"^module datastore '([^']+)' = \{\n(.*?)^\}", main, re.S | re.M)
    path, body = module
    assert "scope: resourceGroup(wsResourceGroup)" in body  # where the workspace is, created or existing
    for line in ("name: datastoreName", "container: dataContainer", "dataAccountName: storage.outputs.dataAccountName"):
        assert line in body, line
    store = (INFRA / path).read_text()
    assert "'Microsoft.MachineLearningServices/workspaces/datastores@" in store
    for line in ("datastoreType: 'AzureBlob'", "credentials: { credentialsType: 'None' }", "containerName: container",
                 "accountName: dataAccountName", "protocol: 'https'", "endpoint: environment().suffixes.storage"):
        assert line in store, line
    assert "TUNEDROP_AZUREML_DATASTORE: datastoreName" in FUNCTION_APP.read_text()


def test_the_identity_that_reads_the_datastore_is_granted_read_on_its_container():
    from tests.rbac import builtin_roles, grants

    roles = builtin_roles()
    read = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read"
    readers = {(g.principal, g.scope) for g in grants() if roles[g.role].allows(read, data=True)}
    assert ("gpu-cluster", f"rg/data/{Settings().azureml_data_container}") in readers
    main = (INFRA / "main.bicep").read_text()
    assert "principalId: workspace.outputs.gpuClusterPrincipalId" in main  # a created workspace's cluster
    assert "principalId: computePrincipalId" in main  # an existing workspace's, when given
