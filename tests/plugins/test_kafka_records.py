"""kafka-emit's queue records and the producer batches built from them (no broker)."""

from __future__ import annotations

import struct

import pytest
from aiokafka.record.default_records import DefaultRecordBatch

from plugins.cloudevents import Envelope, pack, unpack
from plugins.kafka_records import (
    PreparedBatch,
    batch_records,
    record_fields,
    record_key,
    to_format2,
    varint,
)


def _record(i: int, size: int = 40) -> bytes:
    ce_id = b"%036d" % i
    return pack(Envelope(b"key-%d" % i, ce_id, b"t\xc3\xa9", b"v" * size + b"%d" % i))


def _format1(key: bytes, ce_id: bytes, ce_type: bytes, value: bytes) -> bytes:
    head = struct.pack(">BHBH", 1, len(key), len(ce_id), len(ce_type))
    return head + key + ce_id + ce_type + value


def test_varint_is_kafkas_zigzag() -> None:
    assert varint(0) == b"\x00"
    assert varint(1) == b"\x02"
    assert varint(63) == b"\x7e"
    assert varint(64) == b"\x80\x01"
    assert varint(300) == b"\xd8\x04"


def test_record_round_trip_and_key() -> None:
    env = Envelope(b"k" * 200, b"i" * 36, b"type", b"x" * 5000)
    record = pack(env)
    assert record[0] % 2 == 0  # never mistaken for format 1
    assert unpack(record) == env
    assert record_key(record) == env.key


def test_format1_records_are_read_and_converted() -> None:
    old = _format1(b"user-1", b"i" * 36, b"type", b'{"a":1}')
    assert record_fields(old) == (b"user-1", b"i" * 36, b"type", b'{"a":1}')
    assert to_format2(old) == pack(Envelope(b"user-1", b"i" * 36, b"type", b'{"a":1}'))
    assert to_format2(pack(unpack(old))) == pack(unpack(old))


@pytest.mark.parametrize("compression", [None, "gzip"])
@pytest.mark.parametrize("count", [1, 63, 64, 65, 1100])
def test_batches_read_back_as_kafka_record_batches(compression: str | None, count: int) -> None:
    records = [_record(i, size=40 + i % 120) for i in range(count)]
    seen = 0
    while seen < count:
        pieces, n = batch_records(records, seen, 65536)
        assert n >= 1
        batch = PreparedBatch(pieces, n, compression)
        batch._set_producer_state(7, 1, 40)  # as the sender does with idempotence
        data = batch._build()
        assert len(data) <= 65536 or n == 1
        parsed = DefaultRecordBatch(data)
        assert parsed.validate_crc()
        assert parsed.producer_id == 7
        assert parsed.base_sequence == 40
        got = list(parsed)
        assert len(got) == n == batch.record_count()
        for offset, rec in enumerate(got):
            key, ce_id, ce_type, value = record_fields(records[seen + offset])
            assert rec.offset == offset
            assert (rec.key, rec.value) == (key, value)
            assert rec.headers == [("ce_type", ce_type), ("ce_id", ce_id)]
        seen += n
    assert seen == count


def test_a_batch_takes_one_record_larger_than_its_size() -> None:
    records = [_record(0, size=70_000), _record(1)]
    pieces, n = batch_records(records, 0, 65536)
    assert n == 1
    assert (
        next(iter(DefaultRecordBatch(PreparedBatch(pieces, n, None)._build()))).value
        == (record_fields(records[0])[3])
    )
