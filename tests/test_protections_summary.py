"""The start-up protections line: says what is on, never a secret."""

from __future__ import annotations

from fhirbridge.config import Settings, protections_summary


def test_everything_on_and_no_secret_in_the_line(tmp_path):
    s = Settings(
        data_dir=tmp_path,
        auth={"issuer": "https://idp.example.org:8443/realms/x", "jwks_url": "https://k/j"},
        http={"tls_cert_file": "/etc/fb/cert.pem", "tls_key_file": "/etc/fb/key.pem",
              "admin_token": "ADMIN-SECRET-123"},
        mllp={"tls_cert_file": "/c.pem", "tls_key_file": "/k.pem", "tls_client_ca_file": "/ca",
              "allowed_peers": ["10.0.0.0/8", "192.168.1.5/32"]},
        pacs={"url": "dicom+tls://PACS@pacs.example.org:2762", "password": "PACS-PW-456",
              "bearer_token": "PACS-TOKEN-789", "tls_key_file": "/pacs-key.pem"},
        ehr={"fhir_url": "https://ehr.example.org/fhir", "auth": "smart-backend",
             "client_id": "fb", "private_key_file": "/ehr-key.pem", "bearer_token": "EHR-TOK"},
        audit={"syslog_url": "tls://audit.example.org:6514"})
    line = protections_summary(s)
    assert "\n" not in line
    for part in ("auth=on (issuer idp.example.org)", "https=on",
                 "mllp_tls=on, client certificates required",
                 "mllp_allowed_peers=2 (10.0.0.0/8, 192.168.1.5/32)", "admin_token=set",
                 "ehr_auth=smart-backend", "pacs_tls=yes", "audit_syslog=tls"):
        assert part in line, (part, line)
    for secret in ("ADMIN-SECRET-123", "PACS-PW-456", "PACS-TOKEN-789", "EHR-TOK",
                   "key.pem", "/ehr-key.pem", "/pacs-key.pem", "/etc/fb"):
        assert secret not in line, secret


def test_defaults_say_off(tmp_path):
    line = protections_summary(Settings(data_dir=tmp_path))
    for part in ("auth=off", "https=off", "mllp_tls=off", "mllp_allowed_peers=any",
                 "admin_token=not set", "ehr_auth=n/a", "pacs_tls=n/a (folder)",
                 "audit_syslog=off"):
        assert part in line, (part, line)
    plain = Settings(data_dir=tmp_path, pacs={"url": "dicom://PACS@h:104"},
                     mllp={"tls_cert_file": "/c", "tls_key_file": "/k"})
    line = protections_summary(plain)
    assert "pacs_tls=no" in line and "mllp_tls=on, client certificates not required" in line
