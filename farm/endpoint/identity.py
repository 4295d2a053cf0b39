"""The farm's identity: the certificate clients trust and the key that signs for the farm.

It is an NSS database made by upstream's `stap-gen-cert` (so the certificate has exactly the
shape stap clients expect, stap-protocol.md §2.3), kept in `STATE_DIR/endpoint/identity`
(mode 0700, owned by ENDPOINT_USER) and mounted only into the endpoint's front door. No
compile server mounts it: a script that reads the server's files (guru mode, `.incbin` in a
tapset's embedded C) finds only that server's own key, which no client trusts.

    with exported_identity(db_dir, workdir) as (cert_pem, key_pem):
        signer = Signer.load(key_pem)
        signature = signer.sign(module_bytes)     # what stap-serverd writes to .ko.sgn
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from farm.core.errors import FarmError

NICKNAME = "stap-server"  # the certificate's nickname in the database, as upstream's


@dataclass(frozen=True)
class Signer:
    """Signs modules as stap-serverd 5.5+ does for stapusr/stapsys requests: a detached
    PKCS#1 v1.5 RSA signature over the whole `.ko`, SHA-256 (nsscommon.cxx sign_file)."""

    key: rsa.RSAPrivateKey

    @classmethod
    def load(cls, key_file: str) -> Signer:
        """Raises:
            FarmError: KEY_FILE is not an RSA private key in PEM.
        """
        try:
            with open(key_file, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except (OSError, ValueError) as e:
            raise FarmError(f"cannot load the farm's signing key: {e}") from e
        if not isinstance(key, rsa.RSAPrivateKey):
            raise FarmError("the farm's key is not an RSA key (stap signs with RSA)")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())


@contextlib.contextmanager
def exported_identity(db_dir: str, workdir: str) -> Iterator[tuple[str, str]]:
    """The certificate and key of the NSS database DB_DIR as PEM files (cert, key) in WORKDIR
    (a private tmpfs), removed when the block ends.

    NSS refuses to export from a read-only database, so a copy is exported (pk12util).

    Raises:
        FarmError: no database, or the export failed.
    """
    if not os.path.exists(os.path.join(db_dir, "cert9.db")):
        raise FarmError(f"no farm identity in {db_dir}; `stap-server endpoint start` "
                        "creates it")
    work = os.path.join(workdir, f"identity-{os.getpid()}")
    os.makedirs(work, mode=0o700, exist_ok=False)
    try:
        db = os.path.join(work, "db")
        os.mkdir(db, 0o700)
        for name in ("cert9.db", "key4.db", "pkcs11.txt"):
            if os.path.exists(os.path.join(db_dir, name)):
                shutil.copy(os.path.join(db_dir, name), db)
        pw = os.path.join(work, "pw")
        secret = os.urandom(16).hex()
        fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret)
        p12 = os.path.join(work, "id.p12")
        run = subprocess.run(["pk12util", "-o", p12, "-n", NICKNAME, "-d", f"sql:{db}",
                              "-w", pw], capture_output=True, text=True, check=False,
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                  "HOME": work})
        if run.returncode != 0:
            raise FarmError(f"exporting the farm's key from {db_dir} failed: "
                            f"{(run.stderr or run.stdout).strip()}")
        with open(p12, "rb") as f, warnings.catch_warnings():
            # NSS writes BER (indefinite lengths); cryptography parses it and warns.
            warnings.simplefilter("ignore", UserWarning)
            key, cert, _ = pkcs12.load_key_and_certificates(f.read(), secret.encode())
        if key is None or cert is None:
            raise FarmError(f"{db_dir} holds no key and certificate named {NICKNAME}")
        shutil.rmtree(db)
        os.unlink(p12)
        cert_file = os.path.join(work, "cert.pem")
        key_file = os.path.join(work, "key.pem")
        with open(cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        yield cert_file, key_file
    finally:
        shutil.rmtree(work, ignore_errors=True)
