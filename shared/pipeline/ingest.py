"""Ingest: one dataset blob version becomes a run; it is validated streaming, then rejected into
quarantine with its report, or submitted as a fine-tune job. A train/test pair is one run, carried by
its train half."""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from shared import faults, runs
from shared.backends.base import BackendError
from shared.datasets import check_dataset
from shared.intake import FORCE_KEY, SIDECAR_MAX_BYTES, SIDECAR_SUFFIX, forced
from shared.pipeline.steps import Steps, log
from shared.runs import Run, utcnow
from shared.training import TrainingConfig

#: How long a validation claim holds before another delivery may take over (longest function run).
CLAIM_LEASE = timedelta(minutes=10)
#: How long a pair's train half waits for its test half before its run fails.
PAIR_WAIT = timedelta(hours=1)
REPORT_ISSUES_KEPT = 20

#: Characters a dataset's blob name may not hold: control characters (C0, DEL, C1), which log lines,
#: HTTP headers and XML listings cannot carry as they are (Azurite fails every listing that would hold
#: one); lone surrogates and the noncharacters U+FFFE/U+FFFF; the bidirectional controls and the
#: invisible characters (zero-width spaces and joiners, word joiner, soft hyphen, BOM) that make a name
#: read as another.
_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\xad\ud800-\udfff\ufffe\uffff\u200b-\u200f\u202a-\u202e"
                           "\u2060-\u2064\u2066-\u2069\ufeff]")
#: A '.' or '..' path segment: URL clients resolve it away, so the blob cannot be read by its URL, and
#: with a token (no signed path) the request could reach another blob.
_DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.{1,2}(?:[/\\]|$)")


class ValidationProgress:
    """Bytes read so far by validation, recorded on the run (``validated_bytes``) every few seconds for people
    following it; recording is best effort and never slows or fails the validation."""

    EVERY_S = 2.0

    def __init__(self, store, run_id: str):
        self.store, self.run_id = store, run_id
        self.bytes = 0
        self._recorded = time.monotonic()

    def __call__(self, chunk: bytes) -> bytes:
        self.bytes += len(chunk)
        if time.monotonic() - self._recorded >= self.EVERY_S:
            self._recorded = time.monotonic()
            try:
                self.store.update(self.run_id, validated_bytes=self.bytes)
            except Exception as exc:  # noqa: BLE001 - informative only
                log.info("run %s: validation progress not recorded: %s", self.run_id, exc)
        return chunk


def blob_name_problem(name: str, max_chars: int) -> str | None:
    """Why tunedrop will not read a blob by this name, or None. The one rule, for Azure and locally:
    at most TUNEDROP_MAX_BLOB_NAME_CHARS characters, no control or invisible formatting characters, no
    backslash (storage turns it into '/'), no '.' or '..' path segment. Such a blob becomes a rejected
    run (`bad_blob_name`) and is quarantined under a safe name, unread."""
    if len(name) > max_chars:
        return f"the name is {len(name):,} characters long, over TUNEDROP_MAX_BLOB_NAME_CHARS ({max_chars:,})"
    found = sorted({f"U+{ord(c):04X}" for c in _UNSAFE_CHARS.findall(name)})
    if found:
        return (f"the name holds control or invisible characters ({', '.join(found[:5])}), which logs, headers and "
                "storage listings cannot carry as they are")
    if "\\" in name:
        return "the name holds a backslash, which Azure Storage turns into '/'"
    if _DOT_SEGMENT.search(name):
        return "the name has a '.' or '..' path segment, which URLs resolve away: the blob cannot be read by its name"
    return None


def _addressable(name: str) -> str:
    """The name to build a blob URL from: '/' written '\\' when a dot segment would be resolved away
    (storage turns '\\' back into '/', after it has split the container from the blob name)."""
    return name.replace("/", "\\") if _DOT_SEGMENT.search(name) else name


def _safe_basename(name: str) -> str:
    """The last segment of an odd name, percent-encoded, for its place in quarantine."""
    base = quote(re.split(r"[/\\]", name)[-1], safe="")[:200]
    return base if base not in ("", ".", "..") else "blob"


def _metadata_value(text: str) -> str:
    """``text`` as blob metadata can carry it (an HTTP header: printable ASCII), percent-encoded if need be."""
    return text if text.isascii() and text.isprintable() else quote(text, safe="/")


def _compact(report: dict[str, Any]) -> dict[str, Any]:
    """The report as stored on the run record (Table properties are capped at 64 KiB)."""
    return {**report, "errors": report["errors"][:REPORT_ISSUES_KEPT], "warnings": report["warnings"][:REPORT_ISSUES_KEPT]}


class Ingest(Steps):
    def ingest(self, blob, now: datetime | None = None) -> Run | None:
        """One dataset blob version: claim its run, validate it streaming, then reject or submit.

        A train/test pair (:mod:`shared.datasets`) is one run, carried by its train half: the test
        half arriving passes the train half on; a train half alone waits (see PAIR_WAIT)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        from shared.datasets import pair_half

        problem = blob_name_problem(blob.blob_name, self.settings.max_blob_name_chars)
        if problem is not None:
            return self._reject_name(blob, problem, now)
        try:
            props = blob.get_blob_properties()
        except ResourceNotFoundError:
            log.info("blob %s/%r is gone, nothing to ingest", blob.container_name, blob.blob_name)
            return None
        container, name, etag = blob.container_name, blob.blob_name, props.etag
        if name.endswith(SIDECAR_SUFFIX):
            log.info("blob %r is a sidecar of training parameters, read when its dataset is ingested", name)
            return None
        half = pair_half(name)
        partner, partner_props = self._partner(container, half) if half else (None, None)
        if half and half.half == "test":
            if partner is None:
                log.info("blob %s is a test half; its run starts when %s arrives", name, half.partner_hint)
                return None
            return self.ingest(partner, now=now)  # the train half carries the run
        test, test_props = partner, partner_props
        run_id = runs.run_id_for(container, name, etag)
        if test is not None:
            run_id = self._pair_run_id(run_id, container, name, etag, test_props.etag)
        run, created = self.store.create(Run(
            run_id, dataset_container=container, dataset_blob=name, dataset_etag=etag,
            dataset_bytes=props.size, base_model=self.settings.effective_base_model,
            test_blob=test.blob_name if test else "", test_etag=test_props.etag if test else "",
        ))
        if half and test is None:
            return self._wait_for_test(run, half.partner_hint, now)
        if test and run.state == runs.RECEIVED and run.test_etag != test_props.etag:
            run = self.store.update(run_id, test_blob=test.blob_name, test_etag=test_props.etag, error="")
        claimed = self.store.claim(run, CLAIM_LEASE, now=now)
        if claimed is None:
            log.info("run %s: already %s, duplicate delivery ignored", run_id, run.state)
            return run
        try:
            content = hashlib.sha256()
            read = ValidationProgress(self.store, run_id)

            def chunks(client, version):
                stream = client.download_blob(etag=version, match_condition=MatchConditions.IfNotModified)
                return (read(content.update(chunk) or chunk) for chunk in stream.chunks())

            if claimed.test_blob:
                test = test or self.storage.blob_service.get_blob_client(container, claimed.test_blob)
            report, config = check_dataset(
                self.settings, (name, chunks(blob, etag)),
                (claimed.test_blob, chunks(test, claimed.test_etag)) if claimed.test_blob else None,
                metadata=props.metadata, sidecar=self._sidecar(blob), check_base_model=self.backend.check_base_model)
        except ResourceModifiedError:
            # Overwritten while we read it: the new version has its own run; this one ends here.
            return self._fail(claimed, "The blob was overwritten during validation; its new version is a new run.",
                              "superseded")
        except ResourceNotFoundError:
            return self._fail(claimed, "The dataset (or its test half) was deleted during validation; upload it "
                              "again.", "superseded")
        except Exception as exc:
            self.store.release(claimed, f"{type(exc).__name__}: {exc}")
            raise
        report_dict = report.to_dict()
        if not report.accepted:
            location = self._quarantine(blob, etag, run_id, report_dict)
            if claimed.test_blob:
                test = self.storage.blob_service.get_blob_client(container, claimed.test_blob)
                location["test_blob"] = self._quarantine(test, claimed.test_etag, run_id, None)["blob"]
            return self._move(run_id, runs.REJECTED, "run.rejected",
                              {"dataset": name, "report": report_dict, "summary": report.summary(), "quarantine": location},
                              report=_compact(report_dict), error=report.summary())
        earlier = self._same_content(run_id, content.hexdigest(), config)
        force = forced(props.metadata)
        if earlier is not None and not force:
            message = (f"Same content and training parameters as run {earlier.run_id} ({earlier.state}): nothing new "
                       f"to train. Set blob metadata {FORCE_KEY}=true to train it again.")
            report_dict = {**report_dict, "accepted": False, "error_count": 1,
                           "errors": [{"line": None, "code": "duplicate_dataset", "message": message, "field": None}]}
            return self._move(run_id, runs.REJECTED, "run.rejected",
                              {"dataset": name, "report": report_dict, "summary": message, "duplicate_of": earlier.run_id},
                              report=_compact(report_dict), error=message, content_sha256=content.hexdigest())
        claimed = self.store.update(run_id, content_sha256=content.hexdigest(),
                                    base_model=config.base_model or self.settings.effective_base_model)
        if claimed.state != runs.VALIDATING:  # canceled while it was validated: submit nothing
            return claimed
        self.outbox.publish(run_id, "run.accepted", {"dataset": name, "report": report_dict, "summary": report.summary()},
                            sequence=len(claimed.history))
        try:
            job_name = self.backend.submit_finetune(claimed, config)
            faults.point("after_submit")
        except BackendError as exc:
            if exc.retryable:
                self.store.release(claimed, str(exc))
                raise
            return self._fail(claimed, str(exc), exc.code)
        except Exception as exc:
            self.store.release(claimed, f"{type(exc).__name__}: {exc}")
            raise
        display_name = config.display_name(claimed.base_model)
        moved = self._move(run_id, runs.SUBMITTED, "run.submitted",
                           {"job_name": job_name, "display_name": display_name, "config": config.to_dict()},
                           job_name=job_name, display_name=display_name, config=config.to_dict(),
                           report=_compact(report_dict), error="")
        if moved is None and self.store.get(run_id).state == runs.CANCELED:
            self.backend.cancel_job(job_name)  # canceled while it was being submitted: nothing left training
        return moved

    def _partner(self, container: str, half) -> tuple[Any, Any]:
        """(client, properties) of the other half of a train/test pair, or (None, None) while it is missing."""
        from azure.core.exceptions import ResourceNotFoundError

        for name in half.partner_names():
            client = self.storage.blob_service.get_blob_client(container, name)
            try:
                return client, client.get_blob_properties()
            except ResourceNotFoundError:
                continue
        return None, None

    def _pair_run_id(self, run_id: str, container: str, name: str, etag: str, test_etag: str) -> str:
        """The run of a pair: its train half's version's run, unless that run has already gone on
        with another version of the test half (or failed waiting for it). A replaced or late test
        half makes a new pair, which gets a run of its own, as any re-uploaded dataset does."""
        first = self.store.find(run_id)
        if first is None or first.state == runs.RECEIVED or first.test_etag == test_etag:
            return run_id
        return runs.run_id_for(container, name, f"{etag}+{test_etag}")

    def _wait_for_test(self, run: Run, partner: str, now: datetime | None) -> Run:
        """A train half whose test half has not arrived: the run waits in `received` (the test half's
        arrival, or the sweeper, picks it up) and fails once PAIR_WAIT has passed without it."""
        if run.state != runs.RECEIVED:
            return run
        waited = (now or utcnow()) - datetime.fromisoformat(run.created_at)
        if waited > PAIR_WAIT:
            return self._fail(run, f"Its test half {partner} did not arrive within {PAIR_WAIT.total_seconds() / 3600:g} "
                              f"h: upload it and the pair's run starts then (or upload the dataset as one file, "
                              "without .train, to have it split).", "missing_test_file") or self.store.get(run.run_id)
        message = f"Waiting for its test half {partner} (a train/test pair is used as given)."
        if run.error != message:
            run = self.store.update(run.run_id, error=message)
            log.info("run %s: %s", run.run_id, message)
        return run

    def _same_content(self, run_id: str, digest: str, config: TrainingConfig) -> Run | None:
        """An earlier run that trains (or trained) these exact bytes with these exact parameters."""
        for other in self.store.list(content_sha256=digest):
            if other.run_id != run_id and other.state not in (runs.REJECTED, runs.FAILED) \
                    and other.config == config.to_dict():
                return other
        return None

    def _reject_name(self, blob, problem: str, now: datetime | None) -> Run | None:
        """A blob whose name tunedrop will not read (:func:`blob_name_problem`): a rejected run with code
        `bad_blob_name`, the blob quarantined under a safe name (or, if that fails, left where it is and
        logged). Nothing of it is read but its properties."""
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        container, name = blob.container_name, blob.blob_name
        safe = self.storage.blob_service.get_blob_client(container, _addressable(name))
        try:
            props = safe.get_blob_properties()
            etag, size = props.etag, props.size
        except ResourceNotFoundError:
            log.info("blob %r in %s is gone, nothing to ingest", name, container)
            return None
        except AzureError as exc:  # not even its properties: still a rejected run, named and logged
            log.warning("blob %r in %s: its properties cannot be read (%s)", name, container, type(exc).__name__)
            etag, size = "", 0
        run_id = runs.run_id_for(container, name, etag)
        run, _ = self.store.create(Run(run_id, dataset_container=container, dataset_blob=name, dataset_etag=etag,
                                       dataset_bytes=size, base_model=self.settings.effective_base_model))
        claimed = self.store.claim(run, CLAIM_LEASE, now=now)
        if claimed is None:
            log.info("run %s: already %s, duplicate delivery ignored", run_id, run.state)
            return run
        base = f"{run_id}/{_safe_basename(name)}"
        message = (f"Blob name {name!r} is not accepted: {problem}. The blob was not read; upload the dataset again "
                   f"under a plain name (letters, digits, '-', '_', '.', '/').")
        report = {"accepted": False, "errors": [{"line": None, "code": "bad_blob_name", "message": message,
                                                 "field": None}],
                  "warnings": [], "stats": {}, "error_count": 1, "warning_count": 0}
        location = None
        if etag:
            try:
                location = self._quarantine(safe, etag, run_id, report, base=base, source=name)
            except AzureError as exc:
                log.warning("run %s: blob %r could not be quarantined (%s: %s); it stays in %s", run_id, name,
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", container)
        log.warning("run %s: rejected blob %r in %s: %s", run_id, name, container, problem)
        return self._move(run_id, runs.REJECTED, "run.rejected",
                          {"dataset": name, "report": report, "summary": message, "quarantine": location},
                          report=report, error=message)

    def _quarantine(self, blob, etag: str, run_id: str, report: dict[str, Any] | None, base: str | None = None,
                    source: str | None = None) -> dict[str, str]:
        """Move the rejected blob to the quarantine container, its report beside it."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        container = self.storage.ensure_container(self.settings.quarantine_container)
        base = base or f"{run_id}/{blob.blob_name.rsplit('/', 1)[-1]}"
        source = f"{blob.container_name}/{source or blob.blob_name}"
        data = blob.download_blob(etag=etag, match_condition=MatchConditions.IfNotModified)
        container.upload_blob(base, data.chunks(), overwrite=True,
                              metadata={"run_id": run_id, "source": _metadata_value(source)})
        if report is not None:  # None for a pair's test half: the report is beside its train half
            container.upload_blob(f"{base}.report.json", json.dumps(report, indent=2).encode(), overwrite=True)
        try:
            blob.delete_blob(etag=etag, match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            pass  # overwritten or removed meanwhile: leave the newer version alone
        return {"container": self.settings.quarantine_container, "blob": base, "report": f"{base}.report.json"}

    def _sidecar(self, blob) -> tuple[str, bytes | None]:
        """(its name, its bytes or None) of the dataset's sidecar `<name>.tunedrop.json`."""
        from azure.core.exceptions import ResourceNotFoundError

        name = blob.blob_name + SIDECAR_SUFFIX
        client = self.storage.blob_service.get_blob_client(blob.container_name, name)
        try:
            return name, client.download_blob(offset=0, length=SIDECAR_MAX_BYTES + 1).readall()
        except ResourceNotFoundError:
            return name, None
