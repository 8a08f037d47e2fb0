"""Blob created in the training container -> run record -> validate -> submit or quarantine.

The blob arrives as a `BlobClient` (SDK-type binding), so it is streamed in chunks, never loaded
whole. In Azure the trigger's source is Event Grid (the only blob trigger Flex Consumption runs);
`TUNEDROP_BLOB_TRIGGER_SOURCE=LogsAndContainerScan` suits `func start` against Azurite.
"""

import logging
import os

import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob

from shared.pipeline import get_pipeline
from shared.settings import STORAGE_CONNECTION

bp = func.Blueprint()
log = logging.getLogger("tunedrop.functions.ingest")

_SOURCE = func.BlobSource(os.environ.get("TUNEDROP_BLOB_TRIGGER_SOURCE", func.BlobSource.EVENT_GRID.value))


@bp.blob_trigger(arg_name="client", path="%TUNEDROP_TRAINING_CONTAINER%/{name}",
                 connection=STORAGE_CONNECTION, source=_SOURCE)
def ingest(client: blob.BlobClient) -> None:
    run = get_pipeline().ingest(client)
    if run is not None:
        log.info("dataset %r: run %s is %s", client.blob_name, run.run_id, run.state)  # %r: a name may hold control characters
