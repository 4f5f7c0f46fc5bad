"""Settings: one TOML file (`--config`) overlaid by `FHIRBRIDGE_…` environment variables.

Keys and defaults follow docs/contract (the README's Configuration section); read once, in
the composition root (`fhirbridge.app`), never from other modules.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fhirbridge.media.kinds import MediaLimits


class Section(BaseModel):
    """A settings table: an unknown (say, misspelled) key stops start-up with its name."""

    model_config = ConfigDict(extra="forbid")


class HttpSettings(Section):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 64 * 1024 * 1024  # larger bodies get 413 before they are read
    # /review and /admin (PHI for reviewers, operator actions): with a token, only requests
    # bearing it; without one, only clients on loopback
    admin_token: str = ""
    tls_cert_file: str = ""  # both set = HTTPS only
    tls_key_file: str = ""
    max_bundle_entries: int = 100  # POST /fhir Bundles with more entries: 413
    max_json_depth: int = 64  # JSON nested deeper: 400 before it is parsed
    # a client that has not sent its whole request (headers and body) within this many
    # seconds is cut off (408); slowloris and idle clients cannot hold a connection
    request_timeout_seconds: float = 60.0
    max_concurrent_requests: int = 200  # requests in flight beyond this: 503 + Retry-After


class MllpSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 2575
    max_message_bytes: int = 1024 * 1024
    idle_timeout_seconds: float = 600.0
    max_connections: int = 64  # concurrent MLLP connections; more are closed at once
    tls_cert_file: str = ""  # both set = MLLP over TLS only
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # set = clients must present a certificate signed by it
    allowed_peers: list[str] = Field(default_factory=list)  # CIDRs; empty = any
    # ADT trigger events not applied (A02, A03 …), HL7 v2.5.1 2.9.2: "AE" = AE with ERR-3 201
    # unsupported event code; "AA" = AA with MSA-3 "not applied: event not supported"
    unsupported_events: str = Field("AE", pattern="^(AE|AA)$")


class PacsSettings(Section):
    url: str = ""  # file:///dir | dicom[+tls]://CALLED_AET@host:port | http(s)://host/dicom-web
    ae_title: str = "FHIRBRIDGE"
    wado_rs_url: str = ""  # ImagingStudy.endpoint; derived for DICOMweb when empty
    timeout_seconds: float = 30.0
    max_pdu: int = 131072
    correction: str = "resend"  # how re-identified objects reach the PACS: resend | orthanc
    orthanc_url: str = ""  # Orthanc REST base, for correction = "orthanc"
    # dicom+tls:// (PS3.15 B.1 TLS secure transport connection profile)
    tls_ca_file: str = ""  # the PACS's CA; empty = the system's trust store
    tls_cert_file: str = ""  # our client certificate, when the PACS asks for one
    tls_key_file: str = ""
    # STOW-RS (http(s)://) and the Orthanc REST correction: basic or bearer credentials
    username: str = ""
    password: str = ""
    bearer_token: str = ""
    orthanc_username: str = ""  # Orthanc REST (correction = "orthanc"); empty = username
    orthanc_password: str = ""


class AuthSettings(Section):
    """Inbound OAuth2 bearer JWTs (SMART on FHIR); empty issuer = no token auth, and /fhir
    then answers loopback clients only."""

    issuer: str = ""  # expected "iss"
    audience: str = ""  # expected "aud"; empty = the public FHIR base URL
    jwks_url: str = ""  # the issuer's signing keys; empty = {issuer}/.well-known/jwks.json
    leeway_seconds: float = 60.0  # exp / nbf / iat clock skew
    jwks_cache_seconds: float = 3600.0  # keys re-read after this, or at once on an unknown kid
    # advertised in /.well-known/smart-configuration; empty = derived from the issuer
    authorization_endpoint: str = ""
    token_endpoint: str = ""


class AuditSettings(Section):
    """FHIR AuditEvent (IHE BALP) records, kept in the database; optionally forwarded as
    RFC 5424 syslog (IHE ATNA, RFC 5425 TLS transport)."""

    syslog_url: str = ""  # tls://host:port | tcp://host:port | udp://host:port; empty = none
    syslog_ca_file: str = ""  # the collector's CA (tls://); empty = the system's trust store
    syslog_cert_file: str = ""  # our client certificate, when the collector asks for one
    syslog_key_file: str = ""
    source_id: str = "fhirbridge"  # AuditEvent.source.observer / syslog APP-NAME


class RetentionSettings(Section):
    """PHI at rest: what stays under data_dir, and for how long."""

    # keep staged upload bytes and built DICOM copies after the PACS holds the object
    keep_files: bool = False
    # completed submissions (their stored resource, Task and identity history) purged after
    # this many days; 0 = never
    retention_days: float = 30.0


class EhrSettings(Section):
    fhir_url: str = ""  # the EHR's FHIR R4 base; empty = no EHR
    auth: str = "none"  # none | bearer (bearer_token) | smart-backend
    bearer_token: str = ""
    # smart-backend: SMART Backend Services (client_credentials + private_key_jwt)
    client_id: str = ""
    private_key_file: str = ""  # PEM: RSA (RS384) or EC P-384 (ES384)
    key_id: str = ""  # "kid" in the assertion's header
    token_url: str = ""  # empty = from {fhir_url}/.well-known/smart-configuration
    scope: str = "system/Patient.rs system/ImagingStudy.cru system/Binary.r"
    timeout_seconds: float = 15.0
    # how often to re-read stored patients at the EHR for merges (replaced-by) and demographic
    # changes; 0 = never (an upload that follows a replaced-by link still triggers it)
    recheck_seconds: float = 3600.0
    # absolute attachment URLs fhirbridge may fetch (scheme://host[:port]/path-prefix); the
    # EHR base (fhir_url) is always allowed
    attachment_url_allowlist: list[str] = Field(default_factory=list)


class IdentifierDomain(Section):
    """One patient-identifier namespace named in FHIR, HL7 v2 (CX-4) and DICOM (0010,0021)."""

    fhir_system: str
    hl7_assigning_authority: str = ""
    dicom_issuer: str = ""
    default: bool = False


class PipelineSettings(Section):
    workers: int = 2  # worker threads in each process
    # `fhirbridge worker` processes that `serve` starts and runs the pipeline in (each with
    # `workers` threads); 0 = the pipeline runs as `workers` threads inside `serve` itself
    worker_processes: int = 2
    max_attempts: int = 8
    backoff_base_seconds: float = 2.0
    backoff_max_seconds: float = 600.0
    lease_seconds: float = 300.0
    poll_seconds: float = 0.2


class MediaSettings(Section):
    max_pixels: int = 89_478_485  # Pillow's MAX_IMAGE_PIXELS; above is a hard reject
    min_side: int = 0  # minimum of width and height; 0 = no minimum
    uniform_stddev: float = 2.0  # luminance std-dev below this = blank/uniform; 0 = no check
    max_pdf_bytes: int = 64 * 1024 * 1024
    max_video_bytes: int = 512 * 1024 * 1024
    max_video_seconds: float = 600.0
    max_binary_bytes: int = 2 * 1024 * 1024 * 1024  # POST /fhir/Binary raw body; over: 413
    # bytes a decoded image may take (width × height × bytes per pixel, all bands); above is
    # refused before decoding, so a small 16-bit PNG cannot take a worker to gigabytes
    max_decoded_bytes: int = 512 * 1024 * 1024

    def limits(self, http: HttpSettings | None = None) -> MediaLimits:
        """The limits intake and the worker apply; `http` adds the request-shape limits
        (JSON depth, Bundle entries) that intake's parsers check."""
        http = http or HttpSettings()
        return MediaLimits(max_pixels=self.max_pixels, min_side=self.min_side,
                           uniform_stddev=self.uniform_stddev, max_pdf_bytes=self.max_pdf_bytes,
                           max_video_bytes=self.max_video_bytes,
                           max_video_seconds=self.max_video_seconds,
                           max_decoded_bytes=self.max_decoded_bytes,
                           max_json_depth=http.max_json_depth,
                           max_bundle_entries=http.max_bundle_entries)


DEFAULT_DOMAIN = IdentifierDomain(
    fhir_system="urn:oid:2.16.840.1.113883.3.7777",
    hl7_assigning_authority="HOSP",
    dicom_issuer="HOSP",
    default=True,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FHIRBRIDGE_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Path("var")
    database_url: str = ""  # empty = sqlite:///<data_dir>/fhirbridge.db
    public_base_url: str = ""  # how clients reach /fhir; empty = http://host:port/fhir
    http: HttpSettings = Field(default_factory=HttpSettings)
    mllp: MllpSettings = Field(default_factory=MllpSettings)
    pacs: PacsSettings = Field(default_factory=PacsSettings)
    ehr: EhrSettings = Field(default_factory=EhrSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    identifier_domains: list[IdentifierDomain] = Field(
        default_factory=lambda: [DEFAULT_DOMAIN.model_copy()]
    )

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'fhirbridge.db'}"
        if not self.pacs.url:
            self.pacs.url = (self.data_dir / "dicom").resolve().as_uri()
        if not self.identifier_domains:
            raise ValueError("at least one [[identifier_domains]] entry is required")
        if not any(d.default for d in self.identifier_domains):
            self.identifier_domains[0].default = True
        for d in self.identifier_domains:
            d.dicom_issuer = d.dicom_issuer or d.hl7_assigning_authority or d.fhir_system
        return self

    @property
    def default_domain(self) -> IdentifierDomain:
        return next(d for d in self.identifier_domains if d.default)

    @property
    def fhir_base_url(self) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        scheme = "https" if self.http.tls_cert_file and self.http.tls_key_file else "http"
        return f"{scheme}://{self.http.host}:{self.http.port}/fhir"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _TOML_FILE is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_TOML_FILE))
        return tuple(sources)


_TOML_FILE: Path | None = None


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), then the environment; explicit overrides win."""
    global _TOML_FILE
    unknown_environment_keys()
    _TOML_FILE = Path(config_file) if config_file else None
    if _TOML_FILE is not None and not _TOML_FILE.is_file():
        raise FileNotFoundError(f"configuration file not found: {_TOML_FILE}")
    try:
        return Settings(**overrides)
    finally:
        _TOML_FILE = None


ENV_PREFIX = "FHIRBRIDGE_"
# Variables with this prefix belong to the test suite and benchmarks, not to the service.
_NOT_SETTINGS = ("FHIRBRIDGE_TEST_", "FHIRBRIDGE_BENCH_")


def unknown_environment_keys() -> None:
    """A `FHIRBRIDGE_…` variable that names no setting stops start-up with its name (nested
    keys are checked by each table's `extra="forbid"`): a typo must not leave a protection
    off while the operator believes it is on."""
    for name in os.environ:
        if not name.upper().startswith(ENV_PREFIX) or name.upper().startswith(_NOT_SETTINGS):
            continue
        top = name[len(ENV_PREFIX):].split("__", 1)[0].lower()
        if top not in Settings.model_fields:
            raise ValueError(f"unknown setting in the environment: {name} "
                             f"(no top-level key {top!r})")


def _host_of(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def protections_summary(settings: Settings) -> str:
    """One line for the start-up log: which protections are on. Names hosts, modes and CIDRs
    only — never a token, a password, a key or a file's contents."""
    a, h, m, p = settings.auth, settings.http, settings.mllp, settings.pacs
    auth = f"on (issuer {_host_of(a.issuer)})" if a.issuer else "off (/fhir: loopback only)"
    https = "on" if h.tls_cert_file and h.tls_key_file else "off"
    mllp_tls = "off"
    if m.tls_cert_file and m.tls_key_file:
        mllp_tls = "on, client certificates " + ("required" if m.tls_client_ca_file
                                                 else "not required")
    peers = (f"{len(m.allowed_peers)} ({', '.join(m.allowed_peers)})" if m.allowed_peers
             else "any")
    scheme = p.url.split(":", 1)[0].lower()
    pacs_tls = {"dicom+tls": "yes", "https": "yes", "file": "n/a (folder)"}.get(scheme, "no")
    syslog = (settings.audit.syslog_url.split(":", 1)[0].lower() if settings.audit.syslog_url
              else "off")
    return (f"protections: auth={auth}; https={https}; "
            f"mllp_tls={mllp_tls if m.enabled else 'n/a (MLLP off)'}; mllp_allowed_peers={peers}; "
            f"admin_token={'set' if h.admin_token else 'not set (loopback only)'}; "
            f"ehr_auth={settings.ehr.auth if settings.ehr.fhir_url else 'n/a (no EHR)'}; "
            f"pacs_tls={pacs_tls}; audit_syslog={syslog}")
