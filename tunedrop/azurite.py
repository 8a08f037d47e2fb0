"""Start and stop Azurite (Blob, Queue, Table) for the embedded mode and the tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class AzuriteError(RuntimeError):
    """Azurite could not be started; the message says how to install or free it."""


def connection_string(blob_port: int, queue_port: int, table_port: int) -> str:
    return (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{blob_port}/devstoreaccount1;"
        f"QueueEndpoint=http://127.0.0.1:{queue_port}/devstoreaccount1;"
        f"TableEndpoint=http://127.0.0.1:{table_port}/devstoreaccount1;"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def executable() -> str:
    local = PROJECT_ROOT / "node_modules" / ".bin" / "azurite"
    if local.exists():
        return str(local)
    found = shutil.which("azurite")
    if found:
        return found
    raise AzuriteError("Azurite is not installed: run `make setup` (it runs `npm ci`).")


@dataclass
class Azurite:
    """A running Azurite, started by us (``process`` set) or found already listening."""

    blob_port: int
    queue_port: int
    table_port: int
    process: subprocess.Popen | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_port, self.queue_port, self.table_port)

    @classmethod
    def start(cls, location: Path | None = None, *, ports: tuple[int, int, int] | None = None,
              log_file: Path | None = None, timeout_s: float = 30.0) -> "Azurite":
        """Start Azurite on the given ports (default: three free ones).

        With ``location`` data persists there; without it Azurite keeps everything in memory.
        """
        blob, queue, table = ports or (free_port(), free_port(), free_port())
        args = [executable(), "--silent", "--skipApiVersionCheck", "--loose", "--disableTelemetry",
                "--blobPort", str(blob), "--queuePort", str(queue), "--tablePort", str(table)]
        if location is None:
            args.append("--inMemoryPersistence")
        else:
            location.mkdir(parents=True, exist_ok=True)
            args += ["--location", str(location)]
        out = open(log_file, "ab") if log_file else subprocess.DEVNULL
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        azurite = cls(blob, queue, table, process)
        deadline = time.monotonic() + timeout_s
        while not all(port_open(p) for p in (blob, queue, table)):
            if process.poll() is not None:
                raise AzuriteError(f"Azurite exited with code {process.returncode} (ports {blob}/{queue}/{table} busy?).")
            if time.monotonic() > deadline:
                azurite.stop()
                raise AzuriteError(f"Azurite did not listen on {blob}/{queue}/{table} within {timeout_s:.0f} s.")
            time.sleep(0.1)
        return azurite

    @classmethod
    def default_running(cls) -> "Azurite | None":
        """The Azurite on the standard ports 10000-10002, if one is listening."""
        if all(port_open(p) for p in (10000, 10001, 10002)):
            return cls(10000, 10001, 10002)
        return None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

