"""Endorser keys: Ed25519, the private half encrypted with a passphrase.

Files: `KEY` (PKCS#8 PEM, encrypted with the best scheme `cryptography` offers, mode 0600) and
`KEY.pub` (SubjectPublicKeyInfo PEM; that file is the trust anchor a site lists in
`catalogue.trust.keys`). The passphrase comes from `$SALVUS_KEY_PASSPHRASE` or a terminal prompt,
never from the command line, where other users could read it from the process table.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cluster.errors import EXIT_CONFIG, DataError, SalvusError, SpecError
from cluster.files import read_limited

PASSPHRASE_ENV = "SALVUS_KEY_PASSPHRASE"
MAX_KEY_FILE_BYTES = 16 << 10
MIN_PASSPHRASE = 8


class KeyFileError(SalvusError):
    """A key file is unreadable, of the wrong kind, already there for keygen, or its passphrase is
    missing or wrong: the command line or its environment needs fixing (exit 78, like a spec error)."""

    exit_code = EXIT_CONFIG


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def read_passphrase(confirm: bool = False) -> bytes:
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        phrase = env
    elif sys.stdin.isatty():
        phrase = getpass.getpass("key passphrase: ")
        if confirm and getpass.getpass("again: ") != phrase:
            raise KeyFileError("the passphrases differ")
    else:
        raise KeyFileError(f"no passphrase: set ${PASSPHRASE_ENV} or run on a terminal to be prompted")
    if confirm and len(phrase) < MIN_PASSPHRASE:
        raise KeyFileError(f"passphrase too short (at least {MIN_PASSPHRASE} characters)")
    if not phrase:
        raise KeyFileError("empty passphrase")
    return phrase.encode()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Creates `path` with `mode` from the start (no window where a private key is world-readable);
    refuses to overwrite an existing key."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if path exists: never replace a key by accident
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a key") from None
    finally:
        tmp.unlink(missing_ok=True)


def generate_key(out: Path, passphrase: bytes) -> Ed25519PublicKey:
    """Writes OUT (encrypted private key) and OUT.pub; returns the public key."""
    pub_path = public_key_path(out)
    for p in (out, pub_path):
        if p.exists():
            raise KeyFileError(f"{p}: already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(passphrase))
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_new(out, private_pem, 0o600)
    _write_new(pub_path, public_pem(key.public_key()), 0o644)
    return key.public_key()


def public_key_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read_small(path: Path) -> bytes:
    try:
        return read_limited(path, MAX_KEY_FILE_BYTES)
    except DataError as e:
        raise KeyFileError(f"key file {e}") from None


def load_private_key(path: Path, passphrase: bytes) -> Ed25519PrivateKey:
    data = _read_small(path)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        raise KeyFileError(f"{path}: private key is not encrypted; refusing to use it") from None
    except ValueError:
        # cryptography reports a wrong passphrase and a corrupt file alike ("Bad decrypt").
        raise KeyFileError(f"{path}: wrong passphrase, or not an encrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_small(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def load_trust_keys(paths: list[str], source: str = "catalogue.trust.keys") -> list[Ed25519PublicKey]:
    """The spec's trust anchors; a missing or bad file is a configuration error (exit 78)."""
    keys = []
    for i, p in enumerate(paths):
        try:
            keys.append(load_public_key(Path(p)))
        except KeyFileError as e:
            raise SpecError(f"{source}[{i}]: {e}") from None
    return keys


__all__ = ["KeyFileError", "generate_key", "key_id", "load_private_key", "load_public_key",
           "load_trust_keys", "public_key_path", "public_pem", "read_passphrase"]
