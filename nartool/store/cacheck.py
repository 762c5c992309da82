"""Checking a claimed content address against the NAR itself, while it streams past.

Every store that imports a NAR with a ``ca`` field (:class:`~nartool.store.local.LocalStore`,
:class:`~nartool.store.memory.MemoryStore`) verifies it here, from the NAR's events and bytes,
before the path is placed or queued. Nothing is ever read back from the filesystem: what is
checked is exactly what is stored.

* ``text:`` and ``fixed:`` (flat): the NAR must be a single regular file (its root); the hash
  is over that file's contents. Any other root (a symlink, a directory) is refused as soon as
  its event arrives, before anything is restored for it.
* ``fixed:r:sha256:``: the content hash is the NAR hash, so it must equal ``narHash`` (checked
  up front). For a path that refers to itself the content hash is taken modulo the
  self-reference, which is not recomputed here; such claims are accepted as they come
  (importers that do not trust their peer must not rely on them; see ``ca_proves_path``).
* ``fixed:r:<other>:``: the hash of the NAR bytes with that algorithm.

In every case the content address must reproduce the store path from its name and references.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from ..errors import InvalidPathError, StoreError
from ..hashes import Hash
from ..nar.events import Event, File
from .paths import ContentAddress, StorePath
from .types import PathInfo

#: hash algorithms too weak for a content address to stand in for a signature
WEAK_CA_ALGOS = frozenset({"md5", "sha1"})


def ca_proves_path(info: PathInfo, store_dir: str) -> str | None:
    """Why ``info.ca`` cannot, on its own, vouch for ``info.path`` (None = it can): the content
    address must reproduce the path, use a strong hash, and be fully checkable from the NAR."""
    if not info.ca:
        return "it has no content address"
    try:
        ca = ContentAddress.parse(info.ca)
        sp = StorePath.parse(info.path, store_dir)
        reproduced = ca.store_path(sp.name, info.references, store_dir, self_path=info.path) == info.path
    except InvalidPathError:
        reproduced = False
    if not reproduced:
        return "its content address does not reproduce the path"
    if ca.hash.algo in WEAK_CA_ALGOS:
        return (f"its content address uses {ca.hash.algo}, which is too weak to stand in for a signature "
                "(only sha256 and sha512 content addresses are accepted without one)")
    if ca.method == "recursive" and info.path in info.references:
        return "it refers to itself, so its content address cannot be checked against the NAR"
    return None


class CaCheck:
    """Verifies ``info.ca`` against the NAR that is being imported for ``info``.

    Use :meth:`events` on the NAR's event stream and :meth:`update` on its bytes (both may be
    given; each only acts where its method needs it), then :meth:`finish` once the NAR ended.
    Raises :class:`StoreError` (rule ``ca-mismatch``) on any disagreement."""

    def __init__(self, info: PathInfo, store_dir: str) -> None:
        self.path = info.path
        self.rendered = info.ca or ""
        self.ca = ca = ContentAddress.parse(self.rendered)  # (a malformed one: rule bad-ca)
        try:
            sp = StorePath.parse(info.path, store_dir)
            reproduced = ca.store_path(sp.name, info.references, store_dir, self_path=info.path) == info.path
        except InvalidPathError as e:
            raise StoreError(f"content address '{self.rendered}' does not fit path '{info.path}': {e.message}",
                             path=info.path, rule="ca-mismatch", got=self.rendered) from None
        if not reproduced:
            raise StoreError(f"content address '{self.rendered}' does not reproduce path '{info.path}'",
                             path=info.path, rule="ca-mismatch", got=self.rendered)
        self.whole_nar = ca.method == "recursive"
        self.done = False
        self._h: hashlib._Hash | None = None
        if self.whole_nar and ca.hash.algo == "sha256":
            self.done = True  # the NAR hash check covers it
            if info.path not in info.references and ca.hash.digest != info.nar_hash.digest:
                raise StoreError(f"ca hash mismatch importing path '{info.path}': the content address "
                                 f"disagrees with the NAR hash; specified: {ca.hash.prefixed()} "
                                 f"NAR hash: {info.nar_hash.prefixed()}", path=info.path, rule="ca-mismatch",
                                 expected=info.nar_hash.prefixed(), got=ca.hash.prefixed())
        else:
            self._h = hashlib.new(ca.hash.algo)
        self._file_seen = False

    def update(self, b: bytes | bytearray | memoryview) -> None:
        """Feed NAR bytes (used by recursive content addresses)."""
        if self._h is not None and self.whole_nar:
            self._h.update(b)

    def events(self, events: Iterable[Event]) -> Iterator[Event]:
        """Pass the NAR's events through, hashing a flat/text file's contents; refuses any
        other root before it is passed on."""
        if self.whole_nar:
            yield from events
            return
        for ev in events:
            if self._file_seen or not isinstance(ev, File):
                kind = "more than one node" if self._file_seen else f"a {ev.kind}"
                raise StoreError(f"ca hash mismatch importing path '{self.path}': a {self.ca.method} content "
                                 f"address needs a single regular file, the NAR holds {kind}",
                                 path=self.path, rule="ca-mismatch", got=self.rendered)
            self._file_seen = True
            yield File(ev.name, ev.executable, ev.size, self._hashed(ev), ev.offset)

    def _hashed(self, ev: File) -> Iterator[bytes | bytearray | memoryview]:
        h = self._h
        assert h is not None
        for c in ev.chunks:
            h.update(c)
            yield c

    def finish(self) -> None:
        """After the whole NAR went through: raise unless the content hash matched."""
        if self.done:
            return
        assert self._h is not None
        if not self.whole_nar and not self._file_seen:
            raise StoreError(f"ca hash mismatch importing path '{self.path}': a {self.ca.method} content "
                             "address needs a single regular file", path=self.path, rule="ca-mismatch",
                             got=self.rendered)
        got = Hash(self.ca.hash.algo, self._h.digest())
        if got.digest != self.ca.hash.digest:
            raise StoreError(f"ca hash mismatch importing path '{self.path}'; specified: {self.ca.hash.prefixed()} "
                             f"got: {got.prefixed()}", path=self.path, rule="ca-mismatch",
                             expected=self.ca.hash.prefixed(), got=got.prefixed())
        self.done = True
