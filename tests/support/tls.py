"""A throw-away test certificate authority (X.509 with `cryptography`), written as PEM files.

`TestCA(dir)` holds a CA, a server certificate for 127.0.0.1/localhost, a client certificate
from the CA (CN=engine-1), and for refusals a second CA with its own client and server certs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    """One certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _key() -> rsa.RSAPrivateKey:
    # RSA 2048: what every peer here (OpenSSL via Python, DCMTK in Orthanc) accepts
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fhirbridge tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class _Authority:
    def __init__(self, cn: str) -> None:
        self.key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, cn: str, *, server: bool) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if server:  # RFC 6125: the names a client checks are in subjectAltName
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def _write(directory: Path, stem: str, cert: x509.Certificate,
           key: rsa.RSAPrivateKey) -> CertFiles:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return CertFiles(cert_path, key_path)


class TestCA:
    """PEM files under `directory`:
    - `ca_file`: the test CA's certificate (what servers and clients trust);
    - `server`: 127.0.0.1 / ::1 / localhost, signed by the CA;
    - `client`: CN=engine-1, signed by the CA;
    - `other_ca_file`, `other_client` (CN=intruder), `other_server`: a second, untrusted CA.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        ca, other = _Authority("fhirbridge test CA"), _Authority("some other CA")
        self.ca_file = directory / "ca.crt"
        self.ca_file.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
        self.other_ca_file = directory / "other-ca.crt"
        self.other_ca_file.write_bytes(other.cert.public_bytes(serialization.Encoding.PEM))
        self.server = _write(directory, "server", *ca.issue("127.0.0.1", server=True))
        self.client = _write(directory, "client", *ca.issue("engine-1", server=False))
        self.other_client = _write(directory, "other-client",
                                   *other.issue("intruder", server=False))
        self.other_server = _write(directory, "other-server",
                                   *other.issue("127.0.0.1", server=True))

    def client_context(self, cert: CertFiles | None = None, *,
                       ca_file: Path | None = None) -> ssl.SSLContext:
        """A client context that trusts this CA (or `ca_file`) and presents `cert`, if any."""
        ctx = ssl.create_default_context(cafile=str(ca_file or self.ca_file))
        if cert is not None:
            ctx.load_cert_chain(str(cert.cert), str(cert.key))
        return ctx
