"""A mosquitto locked down by ``fedvlm-hub broker-config``, with TLS from a CA made in the test.

``make_pki`` writes a CA and a server certificate for 127.0.0.1/localhost (the
``cryptography`` package, no openssl binary needed). ``LockedMosquitto`` starts the real
``mosquitto`` binary on a free port with the generated ``mosquitto.conf`` as it is, except
for one line when the tests run as root: mosquitto then drops to its own user, which could
not read the pytest temp folders (0700) that hold the files, so it is told to stay root
(``user root``). A production broker runs as its own user and owns these files (README.txt).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from pathlib import Path

from fedvlm.shared.mqtt_link import BrokerAddress
from tests.brokers import LOOPBACK, MosquittoProcess


@dataclasses.dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path  # a CA that did not sign the server: a client trusting it must refuse


def make_pki(directory: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(common_name)).issuer_name(name(common_name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))  # fmt: skip
        return key, cert

    ca_key, ca_cert = ca("FedVLM test CA")
    _, other_ca_cert = ca("Some other CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    pki = Pki(directory / "ca.crt", directory / "server.crt", directory / "server.key", directory / "other-ca.crt")
    pki.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    pki.other_ca_cert.write_bytes(other_ca_cert.public_bytes(pem))
    pki.server_cert.write_bytes(server_cert.public_bytes(pem))
    pki.server_key.write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))  # fmt: skip
    pki.server_key.chmod(0o600)
    return pki


class LockedMosquitto(MosquittoProcess):
    """mosquitto running the configuration broker-config wrote (not the anonymous test one)."""

    def __init__(self, conf_file: Path, port: int) -> None:
        super().__init__(conf_file.parent, port)
        self.config_path = conf_file.with_name("mosquitto-test.conf")
        self.log_path = conf_file.with_name("mosquitto.log")
        text = conf_file.read_text() + f"log_dest file {self.log_path}\n"
        if os.geteuid() == 0:
            text += "user root\n"
        self.config_path.write_text(text)

    def _write_config(self) -> None:
        pass  # written once, from broker-config's file, in __init__

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password and ACL files."""
        assert self.process is not None
        self.process.send_signal(1)

    def address(self, username: str | None = None, password: str | None = None, *,
                ca_file: Path | None = None, tls: bool = True) -> BrokerAddress:  # fmt: skip
        scheme = "mqtts" if tls else "mqtt"
        return BrokerAddress.parse(f"{scheme}://{LOOPBACK}:{self.port}", username=username, password=password,
                                   ca_file=str(ca_file) if ca_file else None)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Login:
    """What ``FakeClient`` needs of a broker (``address``, ``protocol``), with credentials."""

    address: BrokerAddress
    protocol: str = "5"
