"""Access tokens for private swarms.

A token is an ordinary signed record (kind ``"token"``) written by the swarm owner that says
"peer P may join run R until time T".  Reusing the record format means tokens get the same
strict decoding, size limits and signature checks as everything else, and can be published
in the DHT under ``sl_<run>_tokens`` (subkey ``author_subkey(owner, peer hex)``) or handed
out of band.  The record is bound to that DHT key, so a token for one run is useless in
another even if the key names collide.
"""

from __future__ import annotations

import logging

from swarmloco.protocol.identity import PUBLIC_KEY_SIZE, Identity
from swarmloco.protocol.records import RecordError, decode_record, encode_record
from swarmloco.protocol.validators import DEFAULT_PREFIX, swarm_key

logger = logging.getLogger(__name__)

TOKEN_KIND = "token"


def issue_token(
    owner: Identity, peer_public: bytes, run_id: str, expires_at: float, *, prefix: str = DEFAULT_PREFIX
) -> bytes:
    """Sign a token allowing ``peer_public`` into ``run_id`` until ``expires_at`` (unix time)."""
    if not isinstance(peer_public, bytes) or len(peer_public) != PUBLIC_KEY_SIZE:
        raise ValueError(f"peer_public must be {PUBLIC_KEY_SIZE} bytes")
    if not isinstance(run_id, str) or not run_id:
        raise ValueError("run_id must be a non-empty str")
    body = {"peer": peer_public, "run": run_id}
    return encode_record(TOKEN_KIND, body, owner, expires_at, key=swarm_key(run_id, TOKEN_KIND, prefix))


def check_token(
    raw: bytes, owner_public: bytes, peer_public: bytes, run_id: str, now: float, *, prefix: str = DEFAULT_PREFIX
) -> None:
    """Raise ``RecordError`` with a one-line reason unless ``raw`` is a valid, unexpired token
    from ``owner_public`` for ``peer_public`` in ``run_id``."""
    record = decode_record(raw, now=now)
    if record.kind != TOKEN_KIND:
        raise RecordError(f"record kind is {record.kind!r}, not a token")
    if record.author != owner_public:
        raise RecordError("token not issued by the swarm owner")
    if record.key != swarm_key(run_id, TOKEN_KIND, prefix) or record.body.get("run") != run_id:
        raise RecordError("token is for another run")
    if record.body.get("peer") != peer_public:
        raise RecordError("token is for another peer")


def verify_token(
    raw: bytes, owner_public: bytes, peer_public: bytes, run_id: str, now: float, *, prefix: str = DEFAULT_PREFIX
) -> bool:
    """Boolean form of ``check_token``; the reason for a refusal is logged at debug."""
    try:
        check_token(raw, owner_public, peer_public, run_id, now, prefix=prefix)
    except RecordError as e:
        logger.debug("token refused for run %s: %s", run_id, e)
        return False
    return True


def token_subkey(owner_public: bytes, peer_public: bytes) -> str:
    """Where a token is stored: the owner's subkey, tagged with the peer's key (one entry per peer)."""
    return f"{owner_public.hex()}:{peer_public.hex()}"


def read_tokens(values: dict[str, bytes], owner_public: bytes, run_id: str, now: float,
                *, prefix: str = DEFAULT_PREFIX) -> dict[bytes, float]:
    """The peers holding a valid token among a DHT dictionary's ``{subkey: value}``: {public key: expiry}.
    Entries that are not the owner's valid, unexpired token for the peer their subkey names are ignored."""
    admitted: dict[bytes, float] = {}
    for subkey, raw in values.items():
        try:
            record = decode_record(raw, now=now)
            peer = record.body.get("peer")
            if not isinstance(peer, bytes) or subkey != token_subkey(owner_public, peer):
                raise RecordError("token stored under another subkey")
            check_token(raw, owner_public, peer, run_id, now, prefix=prefix)
        except RecordError as e:
            logger.debug("ignoring token entry %.24s: %s", subkey, e)
            continue
        admitted[peer] = max(admitted.get(peer, 0.0), record.expires)
    return admitted
