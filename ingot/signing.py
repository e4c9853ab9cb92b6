"""ed25519 signatures of .ingot files: `ingot keygen`, `ingot sign`, `ingot verify`.

The signed message is a domain tag, the SHA-256 of the header (every byte before the blob, its padding
included) and the SHA-256 of the blob (every byte after), so a changed byte anywhere fails verification.
SHA-256 rather than the per-tensor xxhash: xxhash finds accidents, not forgeries. The signature lives in a
detached FILE.sig (JSON), because safetensors allows no bytes after the last tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ingot.errors import IngotError, VerificationError

DOMAIN = b"ingot-signature-v1\n"


def sig_path(path: str | Path) -> Path:
    return Path(str(path) + ".sig")


def digests(path: str | Path, progress: bool | None = None) -> tuple[str, str]:
    """(sha256 of the header, sha256 of the blob) of a .ingot file; FormatError if it is not one."""
    from ingot.formats.native import NativeFile
    from ingot.progress import byte_bar

    f = NativeFile(path)
    header = hashlib.sha256(f.header_bytes).hexdigest()
    blob = hashlib.sha256()
    with open(f.path, "rb") as fh, byte_bar(f.blob_bytes, "hashing", progress) as bar:
        fh.seek(f.data_start)
        while chunk := fh.read(16 << 20):
            blob.update(chunk)
            bar.update(len(chunk))
    return header, blob.hexdigest()


def _message(header: str, blob: str) -> bytes:
    return DOMAIN + bytes.fromhex(header) + bytes.fromhex(blob)


def keygen(out: str | Path) -> tuple[Path, Path]:
    """OUT.key (PEM private key, readable by its owner only) and OUT.pub (PEM public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key, pub = Path(str(out) + ".key"), Path(str(out) + ".pub")
    for p in (key, pub):
        if p.exists():
            raise IngotError(f"{p} already exists; not overwriting a key")
    k = Ed25519PrivateKey.generate()
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def _load_key(path: str | Path, private: bool):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    path = Path(path)
    if not path.is_file():
        raise IngotError(f"{path}: no such key file")
    try:
        data = path.read_bytes()
        k = (serialization.load_pem_private_key(data, password=None) if private
             else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        what = "private" if private else "public"
        raise IngotError(f"{path}: not a PEM {what} key ({e})") from None
    if not isinstance(k, Ed25519PrivateKey if private else Ed25519PublicKey):
        raise IngotError(f"{path}: not an ed25519 key")
    return k


def sign(path: str | Path, key: str | Path, progress: bool | None = None) -> Path:
    """Write path.sig for a .ingot file with the private key in `key`."""
    from cryptography.hazmat.primitives import serialization

    k = _load_key(key, private=True)
    header, blob = digests(path, progress)
    pub = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    out = sig_path(path)
    out.write_text(json.dumps({"algorithm": "ed25519", "public_key": pub.hex(), "header_sha256": header,
                               "blob_sha256": blob, "signature": k.sign(_message(header, blob)).hex()},
                              indent=2) + "\n")
    return out


def verify(path: str | Path, pubkey: str | Path, sig: str | Path | None = None,
           progress: bool | None = None) -> None:
    """Raise VerificationError unless `sig` (default path.sig) is the key's signature of the file as it is."""
    from cryptography.exceptions import InvalidSignature

    sig = Path(sig) if sig else sig_path(path)
    k = _load_key(pubkey, private=False)
    if not sig.is_file():
        raise VerificationError(f"{path}: no signature file {sig}")
    try:
        s = json.loads(sig.read_text())
        signature = bytes.fromhex(s["signature"])
    except (ValueError, KeyError, TypeError) as e:
        raise VerificationError(f"{sig}: not an Ingot signature file ({e})") from None
    header, blob = digests(path, progress)
    try:
        k.verify(signature, _message(header, blob))
    except InvalidSignature:
        recorded = (("header", "header_sha256", header), ("tensor data", "blob_sha256", blob))
        changed = [what for what, key, now in recorded if s.get(key) != now]
        where = f" (its {' and '.join(changed)} changed since signing)" if changed else ""
        raise VerificationError(f"{path}: signature verification failed{where}, or {sig} was not made by the "
                                f"key in {pubkey}") from None
