"""Identity: key files, signatures and the libp2p identity that keeps a peer id across restarts."""

import os
import pickle
import stat

import hivemind
import pytest
from hivemind.p2p import PeerID

from swarmloco.protocol.identity import Identity


def test_sign_verify_roundtrip_and_rejections():
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"hello")
    assert len(a.public_bytes) == 32 and len(sig) == 64
    assert Identity.verify(a.public_bytes, b"hello", sig)
    assert not Identity.verify(a.public_bytes, b"hellO", sig)
    assert not Identity.verify(b.public_bytes, b"hello", sig)
    assert not Identity.verify(a.public_bytes, b"hello", sig[:-1] + bytes([sig[-1] ^ 1]))
    # malformed inputs are a False, not an exception
    assert not Identity.verify(a.public_bytes[:31], b"hello", sig)
    assert not Identity.verify(a.public_bytes, b"hello", sig[:63])
    assert not Identity.verify(b"\xff" * 32, b"hello", sig)
    assert not Identity.verify("not bytes", b"hello", sig)
    assert not Identity.verify(a.public_bytes, None, sig)


@pytest.mark.parametrize("fmt", ["pem", "raw"])
def test_save_load_atomic_and_private(tmp_path, fmt):
    ident = Identity.generate()
    path = tmp_path / "node.key"
    ident.save(path, fmt=fmt)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["node.key"]  # no temp file left behind
    loaded = Identity.load(path)
    assert loaded == ident and loaded.public_bytes == ident.public_bytes
    assert Identity.verify(ident.public_bytes, b"x", loaded.sign(b"x"))
    if fmt == "raw":
        assert path.read_bytes() == ident.seed and len(ident.seed) == 32
    # overwriting replaces the whole file atomically and keeps the mode
    other = Identity.generate()
    other.save(path, fmt=fmt)
    assert Identity.load(path) == other
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_load_rejects_garbage_and_load_or_generate(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"\x00" * 17)
    with pytest.raises(ValueError):
        Identity.load(bad)
    path = tmp_path / "auto.key"
    first = Identity.load_or_generate(path)
    assert Identity.load_or_generate(path) == first
    assert "Identity(public=" in repr(first) and first.seed.hex() not in repr(first)


def test_libp2p_key_file_format_and_peer_id(tmp_path):
    ident = Identity.generate()
    path = tmp_path / "p2p.key"
    ident.write_libp2p_key(path)
    data = path.read_bytes()
    # crypto.pb PrivateKey{Type: Ed25519(1), Data: seed || public}
    assert data == bytes([0x08, 1, 0x12, 64]) + ident.seed + ident.public_bytes
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load(path) == ident  # the libp2p file is itself a valid identity file
    peer_id = ident.libp2p_peer_id()
    assert peer_id.startswith("12D3KooW")
    assert PeerID(ident.libp2p_peer_id_bytes()).to_base58() == peer_id


def test_dht_uses_identity_and_keeps_peer_id_across_restarts(tmp_path):
    ident = Identity.generate()
    path = tmp_path / "p2p.key"
    ident.write_libp2p_key(path)
    seen = []
    for _ in range(2):  # second start simulates a restart with the same key file
        dht = hivemind.DHT(start=True, identity_path=str(path), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            seen.append(dht.peer_id.to_base58())
        finally:
            dht.shutdown()
    assert seen == [ident.libp2p_peer_id()] * 2


def test_dht_identity_with_initial_peers(tmp_path):
    """hivemind's default identity-taken check parses RSA only; dht_identity_kwargs disables it."""
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        ident = Identity.generate()
        kwargs = ident.dht_identity_kwargs(tmp_path / "p2p.key")
        second = hivemind.DHT(
            start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"], **kwargs
        )
        try:
            assert second.peer_id.to_base58() == ident.libp2p_peer_id()
        finally:
            second.shutdown()
    finally:
        first.shutdown()


def test_identity_pickles_via_seed():
    ident = Identity.generate()
    clone = pickle.loads(pickle.dumps(ident))
    assert clone == ident and Identity.verify(ident.public_bytes, b"m", clone.sign(b"m"))
