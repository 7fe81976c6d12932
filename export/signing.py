"""ed25519 signing of bundles on the workstation: a key pair, and manifest.sig next to a verified manifest.

The signature covers manifest.yaml, which pins every other bundle file by sha256, so one signature covers the
whole bundle. The device verifies it with Bundle.load(public_key=...) (station file: security.bundle_public_key).
Needs the optional `cryptography` package (extra `sign`); nothing here is imported by the device runtime.
"""
from __future__ import annotations

import os
from pathlib import Path

from edge_runtime.bundle import MANIFEST, SIGNATURE, Bundle, BundleError

PRIVATE_KEY_FILE = "bundle_signing_key.pem"   # PKCS#8 PEM, unencrypted, mode 0600: keep it off the devices
PUBLIC_KEY_FILE = "bundle_signing_key.pub"    # SubjectPublicKeyInfo PEM: copy this one to the stations


class SigningError(RuntimeError):
    """The key or the bundle cannot be used for signing; the message names the file."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        raise SigningError("bundle signing needs the 'cryptography' package (pip install 'patchcore-edge[sign]')") from None
    return serialization, Ed25519PrivateKey


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (a private key must never exist world-readable), refusing to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def generate_keypair(directory: str | Path) -> tuple[Path, Path]:
    """Write a new ed25519 key pair into `directory`; returns (private key path, public key path).

    Refuses to overwrite an existing key: replacing a key silently would orphan every station configured with it.
    """
    serialization, Ed25519PrivateKey = _crypto()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path}: already exists; refusing to replace a signing key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return private_path, public_path


def load_private_key(path: str | Path):
    """The Ed25519PrivateKey in a PEM file written by generate_keypair (or openssl genpkey -algorithm ed25519)."""
    serialization, Ed25519PrivateKey = _crypto()
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SigningError(f"{path}: cannot read the private key ({exc.strerror or exc})") from None
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: is a {type(key).__name__}, bundles are signed with ed25519 keys")
    return key


def public_key_bytes(path: str | Path) -> bytes:
    """Raw 32-byte ed25519 public key from a PEM public key file (the form Bundle.load(public_key=...) takes)."""
    serialization, _ = _crypto()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise SigningError(f"{path}: cannot read the public key ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise SigningError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path}: is a {type(key).__name__}, not an ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_bundle(bundle_dir: str | Path, private_key_path: str | Path) -> Path:
    """Verify the bundle (every checksum, the manifest's consistency), then write manifest.sig; returns its path.

    A bundle that does not verify is never signed: the signature would vouch for files that are not the ones
    the manifest describes. The signature is checked against the key's own public half before it is written.
    """
    bundle_dir = Path(bundle_dir)
    key = load_private_key(private_key_path)
    try:
        Bundle.load(bundle_dir, verify=True)
    except BundleError as exc:
        raise SigningError(f"{bundle_dir}: refusing to sign a bundle that does not verify: {exc}") from None
    manifest = (bundle_dir / MANIFEST).read_bytes()
    signature = key.sign(manifest)
    key.public_key().verify(signature, manifest)
    sig_path = bundle_dir / SIGNATURE
    tmp = sig_path.with_name(SIGNATURE + ".tmp")
    tmp.write_bytes(signature)
    os.replace(tmp, sig_path)  # never a half-written signature next to the manifest
    return sig_path
