"""TLS contexts built from settings: the one place that turns certificate settings into
`ssl.SSLContext`s for the HTTPS API, MLLP over TLS, DICOM TLS (PS3.15 B.1) and STOW-RS.

Every context requires TLS 1.2 or newer (RFC 9325 / BCP 195) and keeps Python's secure
defaults (forward-secret ciphers, OpenSSL security level 2, hostname checks for clients).
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsConfigError(ValueError):
    """A TLS setting cannot be used; the text names the setting, never a file's content."""


def enabled(cert_file: str, key_file: str, *, setting: str) -> bool:
    """True when both files are set (TLS only), False when neither is; one without the other
    stops start-up, so a half-configured listener never runs in clear by mistake."""
    if bool(cert_file) != bool(key_file):
        raise TlsConfigError(f"{setting}: tls_cert_file and tls_key_file must be set together")
    return bool(cert_file)


def server_context(cert_file: str, key_file: str, *, client_ca_file: str = "",
                   setting: str = "tls") -> ssl.SSLContext:
    """A server context presenting `cert_file`; with `client_ca_file`, clients must present a
    certificate signed by that CA (mutual TLS, RFC 8446 4.3.2 CertificateRequest)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert_file, key_file, setting)
    if client_ca_file:
        _load_ca(ctx, client_ca_file, setting, "tls_client_ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def optional_server_context(cert_file: str, key_file: str, *, client_ca_file: str = "",
                            setting: str = "tls") -> ssl.SSLContext | None:
    """`server_context` when both files are set, None (plain TCP) when neither is; a client
    CA without a server certificate stops start-up (it would silently accept anyone)."""
    if enabled(cert_file, key_file, setting=setting):
        return server_context(cert_file, key_file, client_ca_file=client_ca_file,
                              setting=setting)
    if client_ca_file:
        raise TlsConfigError(f"{setting}.tls_client_ca_file needs tls_cert_file and "
                             "tls_key_file (client certificates are checked only over TLS)")
    return None


def client_context(*, ca_file: str = "", cert_file: str = "", key_file: str = "",
                   setting: str = "tls") -> ssl.SSLContext:
    """A client context: the server's certificate is checked against `ca_file` (empty = the
    system's trust store) and its name against the host connected to; `cert_file`/`key_file`
    are our client certificate when the peer asks for one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        _load_ca(ctx, ca_file, setting, "tls_ca_file")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise TlsConfigError(f"{setting}: tls_cert_file and tls_key_file must be set "
                                 "together")
        _load_chain(ctx, cert_file, key_file, setting)
    return ctx


def peer_subject_cn(cert: object) -> str:
    """The commonName of a verified peer certificate as `SSLObject.getpeercert()` returns it
    (a dict of RDN tuples); "" when there is none."""
    if not isinstance(cert, dict):
        return ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def _load_chain(ctx: ssl.SSLContext, cert_file: str, key_file: str, setting: str) -> None:
    for name, path in (("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        if not Path(path).is_file():
            raise TlsConfigError(f"{setting}.{name}: the file cannot be read")
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"{setting}: the certificate or its private key cannot be used "
                             "(PEM expected, key matching the certificate, no passphrase)"
                             ) from exc


def _load_ca(ctx: ssl.SSLContext, ca_file: str, setting: str, name: str) -> None:
    if not Path(ca_file).is_file():
        raise TlsConfigError(f"{setting}.{name}: the file cannot be read")
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"{setting}.{name}: no usable CA certificate (PEM expected)"
                             ) from exc


__all__ = ["TlsConfigError", "client_context", "enabled", "optional_server_context",
           "peer_subject_cn", "server_context"]
