"""The composition root: settings are read once here, adapters built here, and handed to the
API, the pipeline workers and the MLLP listener. No other module reads configuration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge

from fhirbridge import __version__
from fhirbridge.adapters.attachments import AttachmentFetcher
from fhirbridge.adapters.blobs import BlobStore, make_private_dir
from fhirbridge.adapters.ehr import FhirEhr
from fhirbridge.adapters.pacs import Pacs, open_pacs
from fhirbridge.adapters.smart_backend import build_ehr_auth
from fhirbridge.api.auth import TokenVerifier
from fhirbridge.audit import AuditRecorder, open_recorder
from fhirbridge.config import Settings
from fhirbridge.media.video import probe_video
from fhirbridge.pipeline.corrections import RECONCILE_JOB, reconcile
from fhirbridge.pipeline.ehr_recheck import EHR_RECHECK_JOB, recheck, schedule_recheck
from fhirbridge.pipeline.retention import RETENTION_JOB, purge_job, schedule_purge
from fhirbridge.pipeline.intake import IntakeContext, StagedBlob
from fhirbridge.pipeline.patient import PatientResolver
from fhirbridge.pipeline.process import Pipeline, PipelineOptions
from fhirbridge.pipeline.queue import JobQueue
from fhirbridge.store.db import Database
from fhirbridge.store.models import BinaryRecord
from fhirbridge.store.patient_index import PatientIndex

log = logging.getLogger("fhirbridge")
T = TypeVar("T")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.uploads_accepted = Counter("fhirbridge_uploads_accepted_total",
                                        "Uploads accepted (201)", registry=self.registry)
        self.jobs = Gauge("fhirbridge_jobs", "Jobs by state", ["state"], registry=self.registry)
        self.hl7_messages = Counter("fhirbridge_hl7_messages_total", "HL7 messages by ACK code",
                                    ["ack"], registry=self.registry)
        self.mllp_refused = Counter("fhirbridge_mllp_connections_refused_total",
                                    "MLLP connections closed at accept, by reason "
                                    "(peer: not in allowed_peers, limit: max_connections)",
                                    ["reason"], registry=self.registry)


@dataclass
class Services:
    settings: Settings
    db: Database
    queue: JobQueue
    blobs: BlobStore
    pacs: Pacs
    ehr: FhirEhr | None
    pipeline: Pipeline
    index: PatientIndex
    metrics: Metrics = field(default_factory=Metrics)
    verifier: TokenVerifier | None = None  # inbound bearer JWTs ([auth]); None = loopback only
    audit: AuditRecorder | None = None  # AuditEvent rows (+ syslog copy), IHE BALP

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """CPU or blocking work off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args))

    def intake_context(self) -> IntakeContext:
        """What intake needs for one request (bundle_blobs is per request)."""
        limits = self.settings.media.limits(self.settings.http)  # + JSON depth, Bundle entries
        return IntakeContext(blobs=self.blobs, limits=limits,
                             local_binary=self.local_binary, url_allowed=self.url_allowed,
                             probe_video=probe_video,
                             own_base=self.settings.fhir_base_url)

    def local_binary(self, binary_id: str) -> StagedBlob | None:
        with self.db.session() as s:
            rec = s.get(BinaryRecord, binary_id)
        if rec is None:
            return None
        return StagedBlob(rec.blob_path, rec.sha256, rec.size, rec.content_type)

    def url_allowed(self, url: str) -> bool:
        fetcher = self.pipeline.fetcher
        return bool(fetcher is not None and fetcher.is_allowed(url))

    def close(self) -> None:
        if self.pipeline.fetcher is not None:
            self.pipeline.fetcher.close()
        self.pacs.close()
        if self.ehr is not None:
            self.ehr.close()
        if self.audit is not None:
            self.audit.close()
        self.db.dispose()


def build_services(settings: Settings) -> Services:
    if make_private_dir(settings.data_dir):  # PHI at rest: the service's own user only
        log.warning("data_dir %s was open to other users; its mode is now 0700",
                    settings.data_dir)
    db = Database(settings.database_url)
    db.create_schema()
    p = settings.pipeline
    queue = JobQueue(db, lease_seconds=p.lease_seconds, max_attempts=p.max_attempts,
                     backoff_base_seconds=p.backoff_base_seconds,
                     backoff_max_seconds=p.backoff_max_seconds)
    blobs = BlobStore(settings.data_dir / "blobs")
    wado = settings.pacs.wado_rs_url
    if not wado and settings.pacs.url.startswith(("http://", "https://")):
        wado = settings.pacs.url  # DICOMweb: WADO-RS lives at the same base as STOW-RS
    ps = settings.pacs
    pacs = open_pacs(ps.url, ae_title=ps.ae_title, wado_rs_url=wado,
                     timeout=ps.timeout_seconds, max_pdu=ps.max_pdu,
                     correction=ps.correction, orthanc_url=ps.orthanc_url,
                     tls_ca_file=ps.tls_ca_file, tls_cert_file=ps.tls_cert_file,
                     tls_key_file=ps.tls_key_file, username=ps.username, password=ps.password,
                     bearer_token=ps.bearer_token, orthanc_username=ps.orthanc_username,
                     orthanc_password=ps.orthanc_password)
    # one credentials object for the EHR (none / bearer / SMART Backend Services), shared by
    # the FHIR client and the attachment fetcher; a wrong [ehr] set-up stops start-up here
    ehr_auth = build_ehr_auth(settings.ehr)
    ehr = (FhirEhr(settings.ehr.fhir_url, timeout=settings.ehr.timeout_seconds,
                   auth=ehr_auth) if settings.ehr.fhir_url else None)
    index = PatientIndex(db)
    resolver = PatientResolver(ehr, index=index)
    pipeline = Pipeline(db, queue, blobs, pacs, resolver, ehr, PipelineOptions(
        domains=settings.identifier_domains,
        instances_dir=settings.data_dir / "instances",
        wado_rs_url=wado,
        limits=settings.media.limits(),
        keep_files=settings.retention.keep_files,
    ))
    services_ref: list[Services] = []
    pipeline.fetcher = AttachmentFetcher(
        settings.ehr.fhir_url, ehr_auth, settings.ehr.attachment_url_allowlist,
        lambda binary_id: services_ref[0].local_binary(binary_id),
        timeout=settings.ehr.timeout_seconds, max_bytes=settings.media.max_binary_bytes)
    pipeline.handlers[RECONCILE_JOB] = partial(reconcile, pipeline)
    pipeline.handlers[EHR_RECHECK_JOB] = partial(recheck, pipeline)
    pipeline.handlers[RETENTION_JOB] = partial(purge_job, pipeline,
                                               settings.retention.retention_days)
    services = Services(settings, db, queue, blobs, pacs, ehr, pipeline, index)
    services.verifier = TokenVerifier.from_settings(settings)  # keys cached for the process
    services.audit = open_recorder(db, settings)
    services_ref.append(services)
    return services


class Workers:
    """Pipeline worker threads (blocking libraries: pydicom, pynetdicom, httpx sync)."""

    def __init__(self, services: Services, count: int) -> None:
        self.services = services
        self.count = count
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        host = socket.gethostname()
        for n in range(self.count):
            owner = f"{host}:{os.getpid()}:{n}"
            t = threading.Thread(target=self.services.pipeline.run_forever,
                                 args=(owner, self.stop_event,
                                       self.services.settings.pipeline.poll_seconds),
                                 name=f"fhirbridge-worker-{n}", daemon=True)
            t.start()
            self.threads.append(t)
        every = self.services.settings.ehr.recheck_seconds
        if self.count and self.services.ehr is not None and every > 0:
            t = threading.Thread(target=self._schedule_rechecks, args=(every,),
                                 name="fhirbridge-ehr-recheck", daemon=True)
            t.start()
            self.threads.append(t)
        days = self.services.settings.retention.retention_days
        if self.count and days > 0:  # [retention] retention_days: a purge at start, then often
            t = threading.Thread(target=self._schedule_purges,
                                 args=(max(1.0, min(3600.0, days * 86400 / 4)),),
                                 name="fhirbridge-retention", daemon=True)
            t.start()
            self.threads.append(t)

    def _schedule_purges(self, every: float) -> None:
        """Queue the retention purge now and every `every` seconds (pipeline.retention)."""
        while True:
            try:
                schedule_purge(self.services.pipeline)
            except Exception:  # database briefly unavailable: try at the next tick
                log.exception("could not schedule the retention purge")
            if self.stop_event.wait(every):
                return

    def _schedule_rechecks(self, every: float) -> None:
        """Queue an EHR recheck every `every` seconds (merges made at the EHR, PIXm-style)."""
        while not self.stop_event.wait(every):
            try:
                schedule_recheck(self.services.pipeline)
            except Exception:  # database briefly unavailable: try at the next tick
                log.exception("could not schedule the EHR recheck")

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)


def create_app(services: Services, *, workers: int | None = None,
               mllp: bool | None = None) -> FastAPI:
    from fhirbridge.api import imagingstudy, ops, review, task, uploads
    from fhirbridge.api.limits import BodySizeLimit, ConcurrencyLimit, RequestTimeout
    from fhirbridge.api.responses import install_error_handlers

    n_workers = services.settings.pipeline.workers if workers is None else workers

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = Workers(services, n_workers)
        pool.start()
        listener = None
        if mllp if mllp is not None else services.settings.mllp.enabled:
            listener = await start_mllp(services)
        app.state.mllp = listener
        try:
            yield
        finally:
            if listener is not None:
                await listener.stop()
            await asyncio.get_running_loop().run_in_executor(None, pool.stop)

    app = FastAPI(title="fhirbridge", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json")
    app.state.services = services
    install_error_handlers(app)
    from fhirbridge.api import auth  # AuthError answers + /fhir/.well-known/smart-configuration

    auth.install_auth_errors(app)
    app.include_router(auth.router)
    for module in (uploads, task, imagingstudy, review, ops):
        app.include_router(module.router)
    from fhirbridge.api import binary  # POST/GET /fhir/Binary: raw bytes, own size limit
    app.include_router(binary.router)
    app.add_middleware(BodySizeLimit, max_bytes=services.settings.http.max_body_bytes,
                       raw_limits=binary.raw_limits(services.settings.media.max_binary_bytes))
    from fhirbridge.api.negotiation import FhirCharset, FormatNegotiation

    app.add_middleware(FormatNegotiation)  # XML asked → 406 (inside audit: refusals audited)
    from fhirbridge.api import auditevent
    from fhirbridge.audit.middleware import AuditMiddleware
    from fhirbridge.audit.recorder import subject_of

    app.include_router(auditevent.router)
    if services.audit is not None:  # outside BodySizeLimit: a 413 is audited too
        app.add_middleware(AuditMiddleware, recorder=services.audit,
                           lookup_patient=partial(subject_of, services.db))
    # added last = outermost: a request over the cap is refused before anything else runs
    app.add_middleware(RequestTimeout, seconds=services.settings.http.request_timeout_seconds)
    app.add_middleware(ConcurrencyLimit,
                       max_requests=services.settings.http.max_concurrent_requests)
    app.add_middleware(FhirCharset)  # outermost: every FHIR JSON answer says charset=utf-8
    return app


async def start_mllp(services: Services) -> Any:
    """The HL7 v2 ADT listener: messages from every connection are applied to the patient
    index by one writer thread in group commits (one transaction per batch, a savepoint per
    message) and acknowledged AA only after that commit has returned."""
    from fhirbridge.hl7 import MLLPServer
    from fhirbridge.pipeline.adt_feed import AdtFeed, GroupCommitter
    from fhirbridge.tls import optional_server_context

    feed = AdtFeed(services.db, services.index, services.settings.identifier_domains,
                   audit=services.audit,
                   unsupported_events=services.settings.mllp.unsupported_events)
    m = services.settings.mllp
    # TLS only when both files are set; a wrong TLS setting stops start-up (fhirbridge.tls)
    tls_context = optional_server_context(m.tls_cert_file, m.tls_key_file,
                                          client_ca_file=m.tls_client_ca_file, setting="mllp")
    writer = GroupCommitter(feed, max_batch=64).start()
    try:
        server = MLLPServer(
            writer.submit, max_message_bytes=m.max_message_bytes,
            idle_timeout=m.idle_timeout_seconds,
            on_ack=lambda code: services.metrics.hl7_messages.labels(ack=code).inc(),
            on_stop=writer.close, ssl_context=tls_context, allowed_peers=m.allowed_peers,
            max_connections=m.max_connections,
            on_refused=lambda reason: services.metrics.mllp_refused.labels(reason=reason).inc())
        await server.start(m.host, m.port)
    except BaseException:
        writer.close()
        raise
    return server
