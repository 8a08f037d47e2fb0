"""Storage clients for the `TUNEDROP_STORAGE` connection, created lazily once per process.

Locally the app setting holds an Azurite connection string. In Azure it is identity-based,
as the Functions host expects for the same connection name: `TUNEDROP_STORAGE__blobServiceUri`,
`__queueServiceUri`, `__tableServiceUri` (and optionally `__clientId` for a user-assigned
identity), so no key is ever stored.
"""

from __future__ import annotations

import os
import threading
from functools import cached_property

from shared.settings import STORAGE_CONNECTION


class StorageConfigError(RuntimeError):
    """The storage connection is not configured; the message lists the app settings to set."""


class Storage:
    def __init__(self, environ: dict[str, str] | None = None, connection: str = STORAGE_CONNECTION):
        self._env = dict(os.environ if environ is None else environ)
        self._name = connection

    @property
    def connection_string(self) -> str | None:
        value = self._env.get(self._name, "")
        return value or None

    def _service_uri(self, kind: str) -> str:
        uri = self._env.get(f"{self._name}__{kind}ServiceUri")
        if not uri:
            account = self._env.get(f"{self._name}__accountName")
            if not account:
                raise StorageConfigError(
                    f"Set {self._name} (a connection string, Azurite only) or "
                    f"{self._name}__{kind}ServiceUri / {self._name}__accountName (managed identity)."
                )
            uri = f"https://{account}.{kind}.core.windows.net"
        return uri

    @cached_property
    def _credential(self):
        from azure.identity import DefaultAzureCredential

        client_id = self._env.get(f"{self._name}__clientId")
        return DefaultAzureCredential(managed_identity_client_id=client_id) if client_id else DefaultAzureCredential()

    @cached_property
    def blob_service(self):
        from azure.storage.blob import BlobServiceClient

        if self.connection_string:
            return BlobServiceClient.from_connection_string(self.connection_string)
        return BlobServiceClient(self._service_uri("blob"), credential=self._credential)

    @cached_property
    def queue_service(self):
        from azure.storage.queue import QueueServiceClient

        if self.connection_string:
            return QueueServiceClient.from_connection_string(self.connection_string)
        return QueueServiceClient(self._service_uri("queue"), credential=self._credential)

    @cached_property
    def table_service(self):
        from azure.data.tables import TableServiceClient

        if self.connection_string:
            return TableServiceClient.from_connection_string(self.connection_string)
        return TableServiceClient(self._service_uri("table"), credential=self._credential)

    def queue(self, name: str, *, base64: bool = True):
        """A queue client; messages are base64 text, as the Functions queue trigger expects."""
        from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy

        if not base64:
            return self.queue_service.get_queue_client(name)
        return self.queue_service.get_queue_client(
            name, message_encode_policy=BinaryBase64EncodePolicy(), message_decode_policy=BinaryBase64DecodePolicy()
        )

    def ensure_container(self, name: str):
        """A client for a blob container that exists: created if it was not (a concurrent creator is fine)."""
        from azure.core.exceptions import ResourceExistsError

        container = self.blob_service.get_container_client(name)
        try:
            container.create_container()
        except ResourceExistsError:
            pass
        return container

    def ensure_queue(self, name: str):
        """A base64 queue client (see :meth:`queue`) for a queue that exists: created if it was not."""
        from azure.core.exceptions import ResourceExistsError

        client = self.queue(name)
        try:
            client.create_queue()
        except ResourceExistsError:
            pass
        return client

    def download_blob(self, container: str, name: str, etag: str | None, dest) -> None:
        """Stream one blob version to ``dest`` (a path); fails if the blob changed since ``etag``."""
        from azure.core import MatchConditions

        blob = self.blob_service.get_blob_client(container, name)
        kwargs = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        with open(dest, "wb") as handle:
            blob.download_blob(**kwargs).readinto(handle)


_lock = threading.Lock()
_default: Storage | None = None


def default_storage() -> Storage:
    """The process-wide Storage for the current environment (one set of clients per process)."""
    global _default
    with _lock:
        if _default is None:
            _default = Storage()
        return _default


def reset_default_storage() -> None:
    """Forget the cached clients (tests that point the environment at another Azurite)."""
    global _default
    with _lock:
        _default = None
