"""kafka-emit's queue records in Kafka's own record encoding, and batches of them.

A queue record (format 2) is the end of a Kafka v2 record (the message format
of KIP-98): key length, key, value length, value, and the headers ``ce_type``
and ``ce_id`` (``ce_id`` last), lengths as zigzag varints. A producer batch is
those records, each with its length, attributes, timestamp delta and offset
delta in front, behind the batch header: per record a table lookup, no
re-encoding and no call into aiokafka. :class:`PreparedBatch` hands the bytes
to aiokafka's accumulator and sender in place of its ``BatchBuilder``.

Format 1 (spooled by earlier versions) is a version byte 1, then a u16 key
length, u8 id length and u16 type length, then key, id, type and value. A
format-2 record starts with the zigzag varint of a length, an even byte, so
the first byte tells them apart; :func:`record_fields` reads both.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from aiokafka.codec import gzip_encode, lz4_encode, zstd_encode
from aiokafka.record.util import calc_crc32c

__all__ = [
    "BATCH_OVERHEAD",
    "SMALL_VARINTS",
    "PreparedBatch",
    "batch_records",
    "headers_tail",
    "record_fields",
    "record_key",
    "record_tail",
    "to_format2",
    "varint",
]

_FORMAT1 = 1
_FORMAT1_HEAD = struct.Struct(">BHBH")
# Batch header, in two parts: the CRC covers everything from the attributes on.
_BEFORE_CRC = struct.Struct(">qiibI")  # base offset, length, leader epoch, magic, crc
_AFTER_CRC = struct.Struct(">hiqqqhii")  # attributes ... record count
BATCH_OVERHEAD = _BEFORE_CRC.size + _AFTER_CRC.size  # 61 bytes
_CODECS: dict[str, tuple[int, Callable[[bytes], bytes]]] = {
    "gzip": (1, gzip_encode),
    "lz4": (3, lz4_encode),
    "zstd": (4, zstd_encode),
}


def varint(n: int) -> bytes:
    """Kafka's zigzag varint of ``n`` (>= 0)."""
    z = n << 1
    out = bytearray()
    while z >= 0x80:
        out.append(z & 0x7F | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    z = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if b < 0x80:
            return (z >> 1) ^ -(z & 1), pos
        shift += 7


# Varints of record lengths up to 4 KiB, and "attributes 0, timestamp delta 0,
# offset delta n" for the first 1024 records of a batch.
SMALL_VARINTS = [varint(n) for n in range(4096)]
_OFFSETS = [b"\x00\x00" + varint(n) for n in range(1024)]
_HEADERS = b"\x04" + varint(7) + b"ce_type"  # two headers; the first one's name


def record_tail(key: bytes, ce_id: bytes, ce_type: bytes, value: bytes) -> bytes:
    """A format-2 queue record."""
    return b"".join(
        (
            varint(len(key)),
            key,
            varint(len(value)),
            value,
            _HEADERS,
            varint(len(ce_type)),
            ce_type,
            varint(5),
            b"ce_id",
            varint(len(ce_id)),
            ce_id,
        )
    )


def headers_tail(ce_type: bytes) -> bytes:
    """What follows the value in every record of this ``ce_type`` (then a 36-byte id)."""
    return _HEADERS + varint(len(ce_type)) + ce_type + varint(5) + b"ce_id" + varint(36)


def record_fields(record: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """A queue record's (key, ce_id, ce_type, value), of either format."""
    if record[0] == _FORMAT1:
        _, klen, ilen, tlen = _FORMAT1_HEAD.unpack_from(record)
        pos = _FORMAT1_HEAD.size + klen
        end = pos + ilen
        return (
            record[_FORMAT1_HEAD.size : pos],
            record[pos:end],
            record[end : end + tlen],
            record[end + tlen :],
        )
    if record[0] & 1:
        raise ValueError(f"unknown event record format {record[0]}")
    fields: list[bytes] = []
    pos = 0
    for _ in range(2):  # key, value
        n, pos = _read_varint(record, pos)
        fields.append(record[pos : pos + n])
        pos += n
    count, pos = _read_varint(record, pos)
    headers: dict[bytes, bytes] = {}
    for _ in range(count):
        n, pos = _read_varint(record, pos)
        name = record[pos : pos + n]
        n, pos = _read_varint(record, pos + n)
        headers[name] = record[pos : pos + n]
        pos += n
    return fields[0], headers[b"ce_id"], headers[b"ce_type"], fields[1]


def record_key(record: bytes) -> bytes:
    """A format-2 record's key (what partitioning needs), without the rest."""
    n, pos = _read_varint(record, 0)
    return record[pos : pos + n]


def to_format2(record: bytes) -> bytes:
    """A record of either format, as format 2."""
    return record_tail(*record_fields(record)) if record[0] == _FORMAT1 else record


def batch_records(records: list[bytes], start: int, max_bytes: int) -> tuple[list[bytes], int]:
    """The framed records[start:] that fit a ``max_bytes`` batch (the first always), and how many.

    The list starts with a placeholder for the batch header (see PreparedBatch).
    """
    lengths = SMALL_VARINTS
    offsets = _OFFSETS
    pieces = [b""]
    append = pieces.append
    size = BATCH_OVERHEAD
    n = 0
    for i in range(start, len(records)):
        record = records[i]
        prefix = offsets[n] if n < 1024 else b"\x00\x00" + varint(n)
        body = len(prefix) + len(record)
        length = lengths[body] if body < 4096 else varint(body)
        size += len(length) + body
        if size > max_bytes and n:
            break
        append(length)
        append(prefix)
        append(record)
        n += 1
    return pieces, n


class PreparedBatch:
    """A finished producer batch, in the place of aiokafka's ``BatchBuilder``.

    The accumulator and sender call ``record_count``, ``closed``, ``close``,
    ``_set_producer_state`` (idempotence) and ``_build``; the header (record
    count, timestamp, producer state, CRC) is written by ``_build``, like
    aiokafka's builder does. All records share the batch's timestamp.
    """

    __slots__ = ("_buffer", "_codec", "_count", "_pieces", "_state", "_timestamp")

    def __init__(self, pieces: list[bytes], count: int, compression: str | None) -> None:
        self._pieces = pieces
        self._count = count
        self._codec = _CODECS[compression] if compression else None
        self._timestamp = int(time.time() * 1000)
        self._state = (-1, -1, 0)  # producer id, epoch, base sequence (aiokafka's defaults)
        self._buffer: bytes | None = None

    def record_count(self) -> int:
        return self._count

    def closed(self) -> bool:
        return True

    def close(self) -> None:
        return None

    def size(self) -> int:
        return len(self._build())

    def _set_producer_state(self, producer_id: int, epoch: int, base_sequence: int) -> None:
        self._state = (producer_id, epoch, base_sequence)
        self._buffer = None

    def _build(self) -> bytes:
        if self._buffer is not None:
            return self._buffer
        pieces = self._pieces
        attributes = 0
        if self._codec is not None:
            codec, encode = self._codec
            plain = b"".join(pieces[1:])
            packed = encode(plain)
            if len(packed) < len(plain):  # else sent uncompressed, as aiokafka does
                attributes = codec
                pieces = [b"", packed]
        ts = self._timestamp
        producer_id, epoch, sequence = self._state
        pieces[0] = _AFTER_CRC.pack(
            attributes, self._count - 1, ts, ts, producer_id, epoch, sequence, self._count
        )
        body = b"".join(pieces)
        crc = calc_crc32c(body)
        head = _BEFORE_CRC.pack(0, len(body) + _BEFORE_CRC.size - 12, -1, 2, crc)
        self._buffer = head + body
        return self._buffer
