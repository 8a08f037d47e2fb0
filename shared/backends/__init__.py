"""Fine-tuning backends: the protocol (base.py) and its two implementations, chosen here.

`local` (local/): LoRA on this machine, MLflow, local model servers. `azureml` (azureml/): the
seed's workflow on Azure Machine Learning. Each loads (with its heavy imports) only when chosen.
"""

from __future__ import annotations

from shared.backends.base import Backend, BackendError


def get_backend(settings, storage=None) -> Backend:
    """The configured backend; ``storage`` is where it keeps what it writes (default: the process's)."""
    if settings.backend == "local":
        from shared.backends.local import LocalBackend

        return LocalBackend(settings)
    if settings.backend == "azureml":
        from shared.backends.azureml import AzureMLBackend

        return AzureMLBackend(settings, storage=storage)
    raise BackendError(f"Unknown backend {settings.backend!r}: use local or azureml.", code="bad_setting")
