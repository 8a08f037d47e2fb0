"""The Azure ML backend: the seed notebook's steps with `azure-ai-ml`, split across events, never waiting.

    submit_finetune   (ingest)      clients -> foundation model -> deployment size, compute and datastore checks
                                    -> train/test split
                                    -> `chat_completion_pipeline` job named after the run, tagged with it
    get_job           (job events)  status; metrics through the workspace's MLflow REST API; failure reason
    register_model    (job events)  `azureml://jobs/<job>/outputs/trained_model` as MLFLOW_MODEL, one version per run
    begin_deploy      (job events)  inference allow-list check, `begin_create_or_update` of the key-auth endpoint
    get_deployment    (sweeper)     endpoint ready -> `begin_create_or_update` of deployment "demo"; its state/error
    activate          (sweeper)     traffic {"demo": 100} with `begin_create_or_update`
    delete_endpoint   (sweeper)     `begin_delete`
    scoring_target    (score)       scoring URI + `get_keys`, cached with an expiry

Nothing here waits on a poller: each `begin_*` returns at once and the next event or sweep reads the
state back from Azure ML. The SDK still polls on a daemon thread of its own; we keep no reference to it.
What a later call needs is kept in Azure itself (the endpoint's tags hold the model to deploy) or, for
the one thing Azure ML does not keep (the async-operation URL that carries a deployment's error), in a
small JSON blob beside the run's data split.

`azure.ai.ml` is imported only inside this package's functions (about 3 s): never on the import path of
`function_app.py`.

The package, by job: `seed.py` the seed's vocabulary (names, parameters, allow lists), `errors.py`
Azure's answers as failure codes and fixes, `split_writer.py` the train/test files, `clients.py` the
SDK clients, `jobs.py` steps 2-7 and `endpoints.py` steps 8-11; :class:`AzureMLBackend` is their sum.
"""

from __future__ import annotations

from shared.backends.azureml.clients import ARM_SCOPE
from shared.backends.azureml.endpoints import STATE_PREFIX, EndpointSteps
from shared.backends.azureml.errors import DEPLOYMENT_FIXES
from shared.backends.azureml.jobs import MAX_METRIC_RUNS, JobSteps
from shared.backends.azureml.seed import (
    ALLOW_LISTS,
    DEPLOYMENT_NAME,
    OPTIONAL_PARAMETERS,
    PIPELINE_COMPONENT,
    SEED_PARAMETERS,
    UNSUPPORTED_FINETUNE_SIZES,
    allow_list,
    finetune_parameters,
    seed_display_name,
)
from shared.backends.azureml.split_writer import write_split

__all__ = [
    "ALLOW_LISTS", "ARM_SCOPE", "DEPLOYMENT_FIXES", "DEPLOYMENT_NAME", "MAX_METRIC_RUNS", "OPTIONAL_PARAMETERS",
    "PIPELINE_COMPONENT", "SEED_PARAMETERS", "STATE_PREFIX", "UNSUPPORTED_FINETUNE_SIZES", "AzureMLBackend",
    "allow_list", "finetune_parameters", "seed_display_name", "write_split",
]


class AzureMLBackend(JobSteps, EndpointSteps):
    """The `azureml` backend (shared/backends/base.py's protocol): the job and serving steps over the clients."""

    name = "azureml"
