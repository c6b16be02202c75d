"""A peer's lineage: the chain of certified rounds behind its global parameters, and the fork choice.

Every peer keeps the certificates (:mod:`swarmloco.protocol.certificates`) of all rounds its state went
through, from a root it trusts: the run's **genesis** (the digest of the model every peer initialises from the
run seed) or, resumed from a checkpoint that holds no usable lineage, its own resumed state. Certificate ``r``
moves the state from the digest at step ``r`` to the digest at step ``r + 1``.

**The fork choice** (docs/lineage.md). Of two chains that share a point and then differ, a peer follows the one
whose rounds since the fork have the most **distinct contributors** (members whose signature is on a
certificate and who count: in a private run only token holders; never an excluded peer); ties go to the most
signatures, then the most samples, then the higher step, then the larger digest: an order every peer computes
alike from the same certificates. A peer that is only behind is the special case of an empty side.

**Cost.** A certificate is about 100 bytes per member; the chain is kept whole, in memory and in checkpoints
(4 members, 10,000 rounds: ~4 MB).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from swarmloco.protocol.certificates import Certificate, CertificateError, check_segment

logger = logging.getLogger(__name__)

Counts = Callable[[bytes], bool]
"""``counts(public_key)``: whether a signer counts as a contributor (admitted, not excluded)."""


@dataclass(frozen=True, order=True)
class Weight:
    """What a chain's rounds since a fork prove, in the order the fork choice compares it."""

    contributors: int
    contributions: int
    samples: int
    step: int
    digest: bytes

    def brief(self) -> str:
        return f"{self.contributors} contributor(s), {self.contributions} signature(s), outer step {self.step}"


class Chain:
    """A root (step, digest) and the certificates of the rounds since, in order."""

    def __init__(self, manifest: str, root_step: int, root_digest: bytes, certs: Iterable[Certificate] = ()):
        self.manifest, self.root_step, self.root_digest = manifest, int(root_step), bytes(root_digest)
        self.certs: list[Certificate] = list(certs)

    @property
    def tip_step(self) -> int:
        return self.root_step + len(self.certs)

    @property
    def tip_digest(self) -> bytes:
        return self.certs[-1].digest if self.certs else self.root_digest

    def digest_at(self, step: int) -> bytes | None:
        if step == self.root_step:
            return self.root_digest
        i = step - self.root_step - 1
        return self.certs[i].digest if 0 <= i < len(self.certs) else None

    def holds(self, step: int, digest_hex_prefix: str) -> bool:
        """Whether this chain went through ``step`` with a digest starting with the given hex."""
        digest = self.digest_at(step)
        return digest is not None and bool(digest_hex_prefix) and digest.hex().startswith(digest_hex_prefix)

    def certs_after(self, step: int) -> list[Certificate]:
        return self.certs[max(0, step - self.root_step):]

    def locator(self) -> list[tuple[int, bytes]]:
        """Points of this chain a peer can say where it stands with: the tip, then exponentially older
        steps, then the root (like a block locator: one of them is the fork point or just after it)."""
        out, back = [], 1
        step = self.tip_step
        while step > self.root_step:
            out.append((step, self.digest_at(step)))
            step -= back
            back *= 2
        out.append((self.root_step, self.root_digest))
        return out

    def extended(self, start_step: int, certs: list[Certificate]) -> Chain:
        """This chain up to ``start_step`` followed by ``certs`` (a candidate chain another peer proved)."""
        return Chain(self.manifest, self.root_step, self.root_digest,
                     self.certs[:start_step - self.root_step] + list(certs))

    def verify(self) -> None:
        """Check the whole chain (a checkpoint's or a proof's); CertificateError says what is wrong."""
        check_segment(self.certs, start_step=self.root_step, start_digest=self.root_digest, manifest=self.manifest)

    # ----- growing -------------------------------------------------------------------------------
    def append(self, cert: Certificate) -> None:
        if cert.step != self.tip_step or cert.parent != self.tip_digest:
            raise CertificateError(f"certificate of outer step {cert.step} does not extend the chain at "
                                   f"{self.tip_step}")
        self.certs.append(cert)

    def add_signature(self, step: int, public_key: bytes, sig: bytes) -> bool:
        """Add a member's signature of the round this chain holds at ``step`` (from its heartbeat)."""
        i = step - self.root_step
        if not 0 <= i < len(self.certs):
            return False
        signed = self.certs[i].with_signature(public_key, sig)
        if signed is None:
            return False
        self.certs[i] = signed
        return True

    def adopt(self, other: Chain) -> None:
        """Become ``other`` (a chain that shares this one's root)."""
        if other.root_step != self.root_step or other.root_digest != self.root_digest:
            raise CertificateError("the adopted chain has another root")
        self.certs = list(other.certs)

    def reset(self, root_step: int, root_digest: bytes, certs: Iterable[Certificate] = ()) -> None:
        self.root_step, self.root_digest, self.certs = int(root_step), bytes(root_digest), list(certs)

    # ----- checkpoints ---------------------------------------------------------------------------
    def to_state(self) -> dict:
        return {"root_step": self.root_step, "root_digest": self.root_digest,
                "certs": [c.encode() for c in self.certs]}

    @classmethod
    def from_state(cls, manifest: str, state: dict) -> Chain:
        """A chain saved by :meth:`to_state`, checked; CertificateError if it is not a valid one."""
        try:
            chain = cls(manifest, int(state["root_step"]), bytes(state["root_digest"]),
                        [Certificate.decode(raw) for raw in state["certs"]])
        except (KeyError, TypeError, ValueError) as e:
            raise CertificateError(f"malformed lineage: {e}") from None
        chain.verify()
        return chain


def fork_point(a: Chain, b: Chain) -> int | None:
    """The highest step at which both chains hold the same digest (None: nothing in common)."""
    low = max(a.root_step, b.root_step)
    for step in range(min(a.tip_step, b.tip_step), low - 1, -1):
        da = a.digest_at(step)
        if da is not None and da == b.digest_at(step):
            return step
    return None


def weight(chain: Chain, since: int, counts: Counts) -> Weight:
    contributors: set[bytes] = set()
    contributions = samples = 0
    for cert in chain.certs_after(since):
        signers = {s for s in cert.signers() if counts(s)}
        contributors |= signers
        contributions += len(signers)
        samples += cert.header.samples
    return Weight(len(contributors), contributions, samples, chain.tip_step, chain.tip_digest)


@dataclass(frozen=True)
class Comparison:
    fork: int
    mine: Weight
    theirs: Weight

    @property
    def theirs_heavier(self) -> bool:
        """Theirs outweighs ours; a chain whose rounds since the fork no counted member signed (only excluded or
        unadmitted peers: a staller committing alone) proves nothing and never does, however long."""
        return self.theirs.contributors > 0 and self.theirs > self.mine

    @property
    def dropped_rounds(self) -> int:
        """Rounds of the lighter side since the fork (what its peers give up when they switch)."""
        return self.mine.step - self.fork


def compare(mine: Chain, theirs: Chain, counts: Counts) -> Comparison | None:
    """Weigh two chains from their fork point (None when they share no point)."""
    fork = fork_point(mine, theirs)
    if fork is None:
        return None
    return Comparison(fork, weight(mine, fork, counts), weight(theirs, fork, counts))


__all__ = ["Chain", "Comparison", "Counts", "Weight", "compare", "fork_point", "weight"]
