"""An append-only, crash-tolerant on-disk FIFO of opaque records.

Used by :class:`aiogateway.delivery.DeliveryQueue` when its sink is failing and
memory is full. Layout of ``spool_dir``::

    <key:020d>-<pid>-<seq>.seg     one segment; oldest key first

A segment is ``MAGIC`` (8 bytes), the *ack offset* (u64 big-endian: where the
first record not yet delivered starts), then records framed as a u32
big-endian length and the bytes. Appends go to the newest segment ("tail"),
reads come from the oldest ("head"); a segment is unlinked once everything in
it was acknowledged. Persisting the ack offset inside the segment is what keeps
a restart from re-sending what was already delivered.

Ownership: every open segment holds an exclusive ``flock``. At startup
:meth:`Spool.adopt` takes every segment no live process holds (left by a
crashed or stopped gateway, or another worker id) and replays it first.
New segments are created under a ``.tmp`` name and renamed once locked, so an
adopting process can never grab a segment its owner has not locked yet.

Durability: appends are buffered and written with ``os.write`` in batches;
``fsync`` happens in batches too (the owner calls :meth:`sync`), never per
record. A torn last record (crash mid-write) is cut off at adoption.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import struct
import time
from collections import deque
from pathlib import Path

__all__ = ["Spool", "SpoolToken"]

log = logging.getLogger("aiogateway.spool")

MAGIC = b"AGSPOOL1"
HEADER = 16  # MAGIC + u64 ack offset
_LEN = struct.Struct(">I")
_ACK = struct.Struct(">Q")
_READ_CHUNK = 1 << 20
_WRITE_THRESHOLD = 64 << 10  # buffered bytes that trigger an os.write from append()
_SEQ = itertools.count(1)  # per process: two spools in one process never pick one name


class _Segment:
    __slots__ = ("ack", "end", "fd", "key", "path", "read", "records")

    def __init__(self, path: Path, fd: int, *, key: int, ack: int, end: int, records: int) -> None:
        self.path = path
        self.fd = fd
        self.key = key
        self.ack = ack  # first record not yet acknowledged
        self.read = ack  # first record not yet handed out by take()
        self.end = end  # end of what was written to the file
        self.records = records  # records between ack and end


class SpoolToken:
    """What :meth:`Spool.take` handed out; pass it to :meth:`Spool.ack` once delivered."""

    __slots__ = ("count", "offset", "segment")

    def __init__(self, segment: _Segment, offset: int, count: int) -> None:
        self.segment = segment
        self.offset = offset
        self.count = count


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class Spool:
    """A FIFO of records in segment files under ``directory``, owned by this process."""

    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._segments: deque[_Segment] = deque()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pending_records = 0
        self._bytes = 0  # unacknowledged framed bytes, pending included
        self._records = 0
        self._dirty: set[int] = set()
        self._dir_dirty = False
        directory.mkdir(parents=True, exist_ok=True)

    # State --------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Framed bytes waiting on disk (or about to be written)."""
        return self._bytes

    @property
    def records(self) -> int:
        return self._records

    def __bool__(self) -> bool:
        return self._records > 0

    # Startup ------------------------------------------------------------------

    def adopt(self) -> int:
        """Take over every segment in the directory no live process holds; return its records."""
        return self.add(self.find_orphans(self.names()))

    def names(self) -> set[str]:
        """File names of the segments this spool holds."""
        return {seg.path.name for seg in self._segments}

    def find_orphans(self, known: set[str]) -> list[_Segment]:
        """Open and lock segments nobody holds; blocking I/O that touches no state of
        this spool, so it may run in a thread. Hand the result to :meth:`add`.
        """
        stale = time.time() - 60
        for tmp in sorted(self.directory.glob("*.seg.tmp")):
            # A crash between create and rename leaves an empty .tmp; a young one
            # may be a segment being born (open, then flock) in another task or process.
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime < stale:
                    self._remove_if_unlocked(tmp)
        found: list[_Segment] = []
        for path in sorted(self.directory.glob("*.seg")):
            if path.name in known:
                continue
            seg = self._open_orphan(path)
            if seg is None:
                continue
            if seg.records == 0:  # all delivered: only the file was left
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
                os.close(seg.fd)
                continue
            found.append(seg)
        return found

    def add(self, found: list[_Segment]) -> int:
        """Merge adopted segments into the FIFO by key (oldest first); return their records."""
        if not found:
            return 0
        for seg in found:
            self._bytes += seg.end - seg.ack
            self._records += seg.records
        self._segments = deque(sorted([*self._segments, *found], key=lambda s: s.path.name))
        return sum(seg.records for seg in found)

    def _remove_if_unlocked(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            if _lock(fd):
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _open_orphan(self, path: Path) -> _Segment | None:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            if not _lock(fd) or os.fstat(fd).st_nlink == 0:
                os.close(fd)  # a live owner, or unlinked by its adopter meanwhile
                return None
            head = os.pread(fd, HEADER, 0)
            if len(head) < HEADER or head[:8] != MAGIC:
                raise ValueError("not a spool segment")
            ack = _ACK.unpack_from(head, 8)[0]
            end, records = self._scan(fd, ack)
            size = os.fstat(fd).st_size
            if end < size:
                log.warning("spool: %s: cut %d bytes of a torn last record", path, size - end)
                os.ftruncate(fd, end)
            key = int(path.name.split("-", 1)[0])
        except (OSError, ValueError, struct.error) as exc:
            # Set aside (still locked, so nobody else is renaming it too) for a human,
            # rather than failing on it again at every scan.
            log.error("spool: cannot adopt %s (%s); renamed to *.bad", path, exc)
            with contextlib.suppress(OSError):
                path.rename(path.with_name(path.name + ".bad"))
            os.close(fd)
            return None
        return _Segment(path, fd, key=key, ack=ack, end=end, records=records)

    @staticmethod
    def _scan(fd: int, offset: int) -> tuple[int, int]:
        """(end of the last whole record, number of records) from ``offset``."""
        records = 0
        buf = b""
        pos = offset  # file offset of buf[0]
        while True:
            chunk = os.pread(fd, _READ_CHUNK, pos + len(buf))
            if not chunk:
                return pos, records
            buf += chunk
            i = 0
            while i + 4 <= len(buf):
                n = _LEN.unpack_from(buf, i)[0]
                if i + 4 + n > len(buf):
                    break
                i += 4 + n
                records += 1
            pos += i
            buf = buf[i:]

    # Writing ------------------------------------------------------------------

    def append(self, record: bytes) -> bool:
        """Queue ``record`` for the tail; False (nothing stored) past ``max_bytes``."""
        size = 4 + len(record)
        if self._bytes + size > self.max_bytes:
            return False
        self._pending.append(_LEN.pack(len(record)))
        self._pending.append(record)
        self._pending_bytes += size
        self._pending_records += 1
        self._bytes += size
        self._records += 1
        if self._pending_bytes >= _WRITE_THRESHOLD:
            self.write_pending()
        return True

    def write_pending(self) -> None:
        """Write buffered records to the tail segment (no fsync). Raises OSError."""
        if not self._pending:
            return
        tail = self._segments[-1] if self._segments else None
        if tail is None or (
            tail.end > HEADER and tail.end + self._pending_bytes > HEADER + self.segment_bytes
        ):
            tail = self._new_segment(time.time_ns())
            self._segments.append(tail)
        data = b"".join(self._pending)
        n = self._pending_records
        self._pending.clear()
        self._pending_bytes = 0
        self._pending_records = 0
        try:
            _pwrite_all(tail.fd, data, tail.end)
        except OSError:
            # Those records are gone: take them out of the accounting, the caller counts them.
            self._bytes -= len(data)
            self._records -= n
            with contextlib.suppress(OSError):
                os.ftruncate(tail.fd, tail.end)
            raise
        tail.end += len(data)
        tail.records += n
        self._dirty.add(tail.fd)

    def _new_segment(self, key: int) -> _Segment:
        name = f"{key:020d}-{os.getpid()}-{next(_SEQ)}.seg"
        tmp = self.directory / (name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _lock(fd)
            _pwrite_all(fd, MAGIC + _ACK.pack(HEADER), 0)
            path = self.directory / name
            tmp.rename(path)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._dir_dirty = True
        self._dirty.add(fd)
        return _Segment(path, fd, key=key, ack=HEADER, end=HEADER, records=0)

    def prepend(self, records: list[bytes]) -> None:
        """Put ``records`` ahead of everything spooled (used at close for what was in memory).

        Ignores ``max_bytes``: they were accepted already, and dropping them at
        shutdown would lose more than the cap protects.
        """
        if not records:
            return
        key = self._segments[0].key - 1 if self._segments else time.time_ns()
        seg = self._new_segment(key)
        data = b"".join(_LEN.pack(len(r)) + r for r in records)
        _pwrite_all(seg.fd, data, HEADER)
        seg.end += len(data)
        seg.records = len(records)
        self._segments.appendleft(seg)
        self._bytes += len(data)
        self._records += len(records)

    # Reading ------------------------------------------------------------------

    def take(self, limit: int) -> tuple[list[bytes], SpoolToken | None]:
        """Up to ``limit`` records from the head, oldest first; ack the token once delivered."""
        if self._pending and len(self._segments) <= 1:
            self.write_pending()  # the head is the tail: what is buffered comes next
        if not self._segments:
            return [], None
        seg = self._segments[0]
        out: list[bytes] = []
        pos = seg.read
        while len(out) < limit and pos < seg.end:
            buf = os.pread(seg.fd, min(_READ_CHUNK, seg.end - pos), pos)
            i = 0
            while len(out) < limit and i + 4 <= len(buf):
                n = _LEN.unpack_from(buf, i)[0]
                if i + 4 + n > len(buf):
                    if i == 0 and len(buf) < 4 + n:  # a record larger than the chunk
                        buf = os.pread(seg.fd, 4 + n, pos)
                        if len(buf) == 4 + n:
                            continue
                    break
                out.append(buf[i + 4 : i + 4 + n])
                i += 4 + n
            if i == 0:
                break  # cannot happen with a scanned segment; never spin
            pos += i
        if not out:
            return [], None
        seg.read = pos
        return out, SpoolToken(seg, pos, len(out))

    def ack(self, token: SpoolToken) -> None:
        """Records up to ``token`` were delivered: persist that, drop finished segments."""
        seg = token.segment
        self._bytes -= token.offset - seg.ack
        self._records -= token.count
        seg.records -= token.count
        seg.ack = token.offset
        seg.read = max(seg.read, seg.ack)
        _pwrite_all(seg.fd, _ACK.pack(seg.ack), 8)
        self._dirty.add(seg.fd)
        if seg.ack >= seg.end:
            self._segments.remove(seg)
            self._unlink(seg)

    def _unlink(self, seg: _Segment) -> None:
        # Unlink while still holding the lock, so nobody can adopt it half-deleted.
        with contextlib.suppress(FileNotFoundError):
            seg.path.unlink()
        self._dirty.discard(seg.fd)
        os.close(seg.fd)
        self._dir_dirty = True

    # Durability ---------------------------------------------------------------

    def dirty_fds(self) -> list[int]:
        """Descriptors to fsync (and clears the set); the directory's own is added if needed."""
        fds = list(self._dirty)
        self._dirty.clear()
        if self._dir_dirty:
            self._dir_dirty = False
            fds.append(-1)
        return fds

    def fsync(self, fds: list[int]) -> None:
        """fsync ``fds`` (-1: the directory). Blocking; safe to run in a thread."""
        for fd in fds:
            try:
                if fd == -1:
                    dfd = os.open(self.directory, os.O_RDONLY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
                else:
                    os.fsync(fd)
            except OSError as exc:  # a segment closed meanwhile; nothing left to sync
                log.debug("spool: fsync: %s", exc)

    def sync(self) -> None:
        """Write what is buffered and fsync it, now (blocking)."""
        self.write_pending()
        self.fsync(self.dirty_fds())

    def close(self) -> None:
        """Sync and release every segment; the files stay for the next owner."""
        try:
            self.sync()
        finally:
            for seg in self._segments:
                os.close(seg.fd)
            self._segments.clear()
