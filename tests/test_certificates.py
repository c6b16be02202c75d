"""Certificates of committed rounds: members' signatures over one header, checked offline."""

from __future__ import annotations

import hashlib

import pytest

from swarmloco.protocol.certificates import Certificate, CertificateError, RoundHeader, check_segment, sign_round
from swarmloco.protocol.identity import Identity

MANIFEST = "ab" * 32
A, B, C, MALLORY = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3, 9))


def digest(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest()


def header(step: int = 0, members=(A, B, C), parent: bytes | None = None, manifest: str = MANIFEST) -> RoundHeader:
    return RoundHeader(manifest=manifest, step=step, parent=parent or digest(step), digest=digest(step + 1),
                       members=tuple(sorted(m.public_bytes for m in members)), samples=96)


def signed(h: RoundHeader, *by: Identity) -> Certificate:
    cert = sign_round(h, by[0])
    for who in by[1:]:
        cert = cert.with_signature(who.public_bytes, who.sign(h.payload()))
    return cert


def test_every_members_signature_counts_and_survives_encoding() -> None:
    cert = signed(header(), A, B, C)
    again = Certificate.decode(cert.encode())
    assert again == cert and again.signers() == {A.public_bytes, B.public_bytes, C.public_bytes}


def test_a_signature_of_another_header_or_by_a_non_member_is_refused() -> None:
    cert = sign_round(header(), A)
    assert cert.with_signature(B.public_bytes, B.sign(header(step=5).payload())) is None  # another round
    assert cert.with_signature(MALLORY.public_bytes, MALLORY.sign(header().payload())) is None  # not a member
    assert cert.with_signature(A.public_bytes, A.sign(header().payload())) is None  # signed already
    with pytest.raises(CertificateError, match="member"):
        sign_round(header(), MALLORY)


def test_a_forged_signature_counts_for_nobody() -> None:
    cert = sign_round(header(), A)
    forged = Certificate(cert.header, ((1, b"\x00" * 64),) + cert.sigs)
    assert forged.signers() == {A.public_bytes}


def test_a_certificate_replayed_into_another_run_or_step_is_not_evidence() -> None:
    cert = signed(header(), A, B)
    moved = Certificate(header(manifest="cd" * 32), cert.sigs)  # same signatures, another run
    assert moved.signers() == frozenset()
    later = Certificate(header(step=1, parent=digest(0)), cert.sigs)  # same signatures, another step
    assert later.signers() == frozenset()


def chain(n: int, *by: Identity) -> list[Certificate]:
    return [signed(header(step=i), *by) for i in range(n)]


def test_a_chain_that_links_digest_to_digest_checks() -> None:
    check_segment(chain(4, A, B), start_step=0, start_digest=digest(0), manifest=MANIFEST)


@pytest.mark.parametrize("tamper, message", [
    (lambda c: c[:1] + c[2:], "jumps"),
    (lambda c: [c[0], Certificate(header(step=1, parent=digest(42)), c[1].sigs)] + c[2:], "does not start"),
    (lambda c: [Certificate(c[0].header, ())] + c[1:], "no valid member signature"),
    (lambda c: [signed(header(step=0, manifest="cd" * 32), A)] + c[1:], "another run"),
])
def test_a_broken_chain_is_refused_naming_the_step(tamper, message) -> None:
    with pytest.raises(CertificateError, match=message):
        check_segment(tamper(chain(4, A, B)), start_step=0, start_digest=digest(0), manifest=MANIFEST)


@pytest.mark.parametrize("raw", [
    b"", b"\xc1", b"\x90", b"not msgpack at all", b"\x81\xa1v\x02",
    signed(header(), A).encode()[:-7],  # truncated
    signed(header(), A).encode() + b"\x00",  # trailing bytes
])
def test_hostile_bytes_are_a_one_line_certificate_error(raw: bytes) -> None:
    with pytest.raises(CertificateError):
        Certificate.decode(raw)


def test_unsorted_or_repeated_members_are_refused() -> None:
    members = tuple(sorted(m.public_bytes for m in (A, B)))
    with pytest.raises(CertificateError, match="sorted"):
        RoundHeader(manifest=MANIFEST, step=0, parent=digest(0), digest=digest(1), members=members[::-1])
    with pytest.raises(CertificateError, match="sorted"):
        RoundHeader(manifest=MANIFEST, step=0, parent=digest(0), digest=digest(1), members=(members[0],) * 2)
