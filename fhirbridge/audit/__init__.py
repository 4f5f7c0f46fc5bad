"""The audit trail: FHIR R4 AuditEvent records shaped as IHE Basic Audit Log Patterns (BALP),
kept in the database and optionally forwarded as RFC 5424 syslog (IHE ATNA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fhirbridge.audit.events import (
    Agent,
    AuditRow,
    Entity,
    adt_event,
    interaction_of,
    outcome_of,
    rest_event,
    review_event,
)
from fhirbridge.audit.recorder import AuditRecorder, subject_of

if TYPE_CHECKING:
    from fhirbridge.config import Settings
    from fhirbridge.store.db import Database

__all__ = ["Agent", "AuditRecorder", "AuditRow", "Entity", "adt_event", "interaction_of",
           "outcome_of", "rest_event", "review_event", "subject_of", "open_recorder"]


def open_recorder(db: Database, settings: Settings) -> AuditRecorder:
    """The recorder for these settings (`[audit]`), with its syslog forwarder if configured."""
    from fhirbridge.adapters.syslog import SyslogForwarder

    a = settings.audit
    forwarder = (SyslogForwarder(a.syslog_url, app_name=a.source_id, ca_file=a.syslog_ca_file,
                                 cert_file=a.syslog_cert_file, key_file=a.syslog_key_file)
                 if a.syslog_url else None)
    return AuditRecorder(db, source_id=a.source_id, server_address=settings.fhir_base_url,
                         forwarder=forwarder)
