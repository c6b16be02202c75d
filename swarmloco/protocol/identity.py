"""Peer identities: one Ed25519 key pair per node.

The same key does two jobs:

* it signs every swarmloco DHT record (see ``records.py``), so peers can tell who wrote what;
* it is the node's libp2p identity, so its peer id survives restarts.  hivemind's
  ``DHT(identity_path=...)`` hands the file to ``p2pd -id``, which expects a libp2p
  ``crypto.pb`` ``PrivateKey`` message.  For Ed25519 go-libp2p stores ``Data`` as the
  64-byte ``seed || public key``; ``write_libp2p_key`` produces exactly that.

Key files hold secrets, so they are written atomically (temp file + ``os.replace``) with
mode 0600: a crash never leaves a truncated key and the key is never world-readable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

logger = logging.getLogger(__name__)

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_SEED_SIZE = 32

# libp2p crypto.pb: message PrivateKey/PublicKey { required KeyType Type = 1; required bytes Data = 2; }
# with KeyType.Ed25519 = 1.  Protobuf wire form: 0x08 <type varint> 0x12 <len> <data>.
_LIBP2P_ED25519 = 1
_LIBP2P_PRIV_PREFIX = bytes([0x08, _LIBP2P_ED25519, 0x12, _SEED_SIZE + PUBLIC_KEY_SIZE])
_LIBP2P_PUB_PREFIX = bytes([0x08, _LIBP2P_ED25519, 0x12, PUBLIC_KEY_SIZE])
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"

PathLike = Union[str, os.PathLike]


def _b58encode(data: bytes) -> str:
    """base58btc (bitcoin alphabet), as used by libp2p peer ids; tiny, so no dependency."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    leading_zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * leading_zeros + "".join(reversed(out))


def _b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        digit = _B58_ALPHABET.find(ch)
        if digit < 0:
            raise ValueError("not base58")
        n = n * 58 + digit
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def public_key_of_peer_id(peer_id: str | bytes) -> bytes | None:
    """The Ed25519 public key inlined in a libp2p peer id (base58 text or multihash bytes), or None.

    swarmloco peers always run p2pd with their Ed25519 key, whose peer id is the *identity* multihash
    of the protobuf public key: the key can be read back from the id, so whoever p2pd authenticated
    (Noise) as that peer id holds that key. Ids of other key types (hashed RSA keys) give None.
    """
    expected = 2 + len(_LIBP2P_PUB_PREFIX) + PUBLIC_KEY_SIZE
    if not isinstance(peer_id, (str, bytes, bytearray)) or len(peer_id) > 2 * expected:
        return None  # bounded before decoding: base58 decoding is quadratic in the length
    try:
        raw = _b58decode(peer_id) if isinstance(peer_id, str) else bytes(peer_id)
    except (ValueError, TypeError):
        return None
    if len(raw) != expected or raw[0] != 0x00 or raw[1] != expected - 2 or raw[2:6] != _LIBP2P_PUB_PREFIX:
        return None
    return raw[6:]


def peer_id_of_public_key(public: bytes) -> str:
    """The base58 libp2p peer id of an Ed25519 public key (inverse of :func:`public_key_of_peer_id`)."""
    public_pb = _LIBP2P_PUB_PREFIX + public
    return _b58encode(bytes([0x00, len(public_pb)]) + public_pb)


def _atomic_write(path: PathLike, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` so that ``path`` is either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclasses.dataclass(frozen=True, repr=False)
class Identity:
    """An Ed25519 key pair.  ``repr`` shows only the public key, never the secret."""

    _private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if not isinstance(seed, bytes) or len(seed) != _SEED_SIZE:
            raise ValueError(f"Ed25519 seed must be {_SEED_SIZE} bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_bytes(cls, data: bytes) -> Identity:
        """Parse any supported key encoding: PEM (PKCS#8), raw 32-byte seed, or libp2p protobuf."""
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("PEM file does not hold an Ed25519 private key")
            return cls(key)
        if len(data) == _SEED_SIZE:
            return cls.from_seed(data)
        if len(data) == len(_LIBP2P_PRIV_PREFIX) + 64 and data.startswith(_LIBP2P_PRIV_PREFIX):
            body = data[len(_LIBP2P_PRIV_PREFIX) :]
            identity = cls.from_seed(body[:_SEED_SIZE])
            if identity.public_bytes != body[_SEED_SIZE:]:
                raise ValueError("libp2p key file: public half does not match the seed")
            return identity
        raise ValueError("unrecognised key file (expected PEM, 32-byte seed or libp2p Ed25519 protobuf)")

    @classmethod
    def load(cls, path: PathLike) -> Identity:
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    @classmethod
    def load_or_generate(cls, path: PathLike) -> Identity:
        """Load the key at ``path``; create and save a fresh one if the file does not exist."""
        if os.path.exists(path):
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        logger.info("generated new identity %s at %s", identity.public_hex[:16], path)
        return identity

    def save(self, path: PathLike, fmt: Literal["pem", "raw"] = "pem") -> None:
        """Save the private key (PEM PKCS#8 or the raw 32-byte seed) atomically, mode 0600."""
        if fmt == "pem":
            data = self._private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        elif fmt == "raw":
            data = self.seed
        else:
            raise ValueError(f"unknown key format {fmt!r}")
        _atomic_write(path, data)

    @property
    def seed(self) -> bytes:
        return self._private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public_bytes(self) -> bytes:
        return self._private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_hex(self) -> str:
        """Lowercase hex of ``public_bytes``: the owner tag used in DHT subkeys."""
        return self.public_bytes.hex()

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)

    @staticmethod
    def verify(public_bytes: bytes, data: bytes, sig: bytes) -> bool:
        """True iff ``sig`` is ``public_bytes``' signature of ``data``; never raises on bad input."""
        if not (isinstance(public_bytes, bytes) and isinstance(data, bytes) and isinstance(sig, bytes)):
            return False
        if len(public_bytes) != PUBLIC_KEY_SIZE or len(sig) != SIGNATURE_SIZE:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public_bytes).verify(sig, data)
            return True
        except (InvalidSignature, ValueError):
            return False

    # --- libp2p -------------------------------------------------------------------------

    def libp2p_private_key(self) -> bytes:
        """Protobuf-serialized libp2p ``PrivateKey`` (Ed25519, Data = seed || public key)."""
        return _LIBP2P_PRIV_PREFIX + self.seed + self.public_bytes

    def write_libp2p_key(self, path: PathLike) -> None:
        """Write the key file to pass as ``hivemind.DHT(identity_path=...)`` (atomic, 0600).

        Pass ``check_if_identity_free=False`` along with it when bootstrapping from
        ``initial_peers``: hivemind's identity check parses the file as an RSA key only.
        """
        _atomic_write(path, self.libp2p_private_key())

    def dht_identity_kwargs(self, path: PathLike) -> dict:
        """Write the libp2p key to ``path`` and return the ``hivemind.DHT`` kwargs that use it.

        ``check_if_identity_free`` is disabled because hivemind's check
        (``PeerID.from_identity``) can only parse RSA keys and raises on Ed25519 ones.
        """
        self.write_libp2p_key(path)
        return {"identity_path": os.fspath(path), "check_if_identity_free": False}

    def libp2p_peer_id_bytes(self) -> bytes:
        """Identity multihash (code 0x00) of the protobuf public key: keys <= 42 bytes are inlined."""
        public_pb = _LIBP2P_PUB_PREFIX + self.public_bytes
        return bytes([0x00, len(public_pb)]) + public_pb

    def libp2p_peer_id(self) -> str:
        """The base58btc peer id p2pd derives from this key (starts with ``12D3KooW``)."""
        return peer_id_of_public_key(self.public_bytes)

    def __repr__(self) -> str:
        return f"Identity(public={self.public_hex[:16]}…)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other.public_bytes == self.public_bytes

    def __hash__(self) -> int:
        return hash(self.public_bytes)

    def __reduce__(self):
        # Ed25519PrivateKey does not pickle; ship the seed so identities can cross processes.
        return (Identity.from_seed, (self.seed,))


def load_identity(path: str) -> Identity:
    """The peer's key: loaded from ``path`` (created there if missing), or fresh for this run if empty.
    Raises ValueError with a one-line reason for an unreadable key file."""
    if not path:
        return Identity.generate()
    try:
        if not os.path.exists(path):
            identity = Identity.generate()
            identity.write_libp2p_key(path)
            logger.info("generated a new identity %s at %s", identity.libp2p_peer_id(), path)
            return identity
        return Identity.load(path)
    except FileNotFoundError:
        raise ValueError(f"identity file {path}: the folder {Path(path).parent} does not exist") from None
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ValueError(f"identity file {path}: {reason}") from None


def p2pd_key_file(identity: Identity, workdir: str) -> str:
    """Write ``identity`` as the libp2p key p2pd reads (0600, in a private temp dir): p2pd then runs with the
    same key that signs our records, so our peer id inlines our public key."""
    path = os.path.join(workdir, "p2pd.key")
    identity.write_libp2p_key(path)
    return path
