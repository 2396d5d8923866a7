"""Tests of streaming.sources: synthetic fleet, file loaders, bad-row accounting, dispatcher."""

from __future__ import annotations

import csv
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from streaming.messages import Reading
from streaming.sources import (
    ANOMALY_KINDS,
    LoadReport,
    csv_readings,
    edge_iiot_readings,
    open_source,
    parse_edge_iiot_time,
    skab_files,
    skab_readings,
    synthetic_fleet,
    synthetic_fleet_arrays,
    wsn_readings,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SKAB = DATA / "skab"
WSN = DATA / "wsn" / "data.csv"


def _assert_event_time_order(readings: list[Reading]) -> None:
    stamps = [r.timestamp for r in readings]
    assert all(a <= b for a, b in pairwise(stamps))
    assert all(r.timestamp.tzinfo is not None for r in readings[:100])


# ---------------------------------------------------------------------------- synthetic fleet


@pytest.fixture(scope="module")
def fleet():
    return synthetic_fleet_arrays(num_devices=500, readings_per_device=200, seed=42)


def _per_device(arrays, field: str) -> np.ndarray:
    """Reshape a column to [device, time] (arrays are in event-time order, not device order)."""
    order = np.lexsort((arrays.timestamp_ms, arrays.device))
    return getattr(arrays, field)[order].reshape(len(arrays.device_ids), -1)


def test_fleet_is_deterministic_for_a_seed_and_differs_for_another(fleet):
    again = synthetic_fleet_arrays(num_devices=500, readings_per_device=200, seed=42)
    other = synthetic_fleet_arrays(num_devices=500, readings_per_device=200, seed=43)
    for name in ("device", "timestamp_ms", "value", "label", "anomaly_kind"):
        np.testing.assert_array_equal(getattr(fleet, name), getattr(again, name))
    assert not np.array_equal(fleet.value, other.value)


def test_a_device_stream_does_not_depend_on_fleet_size(fleet):
    small = synthetic_fleet_arrays(num_devices=7, readings_per_device=200, seed=42)
    np.testing.assert_array_equal(_per_device(small, "value"), _per_device(fleet, "value")[:7])
    np.testing.assert_array_equal(_per_device(small, "label"), _per_device(fleet, "label")[:7])


def test_fleet_counts_ids_and_event_time_order(fleet):
    assert len(fleet) == 500 * 200
    assert fleet.device_ids[0] == "device_0000" and fleet.device_ids[-1] == "device_0499"
    assert np.bincount(fleet.device, minlength=500).tolist() == [200] * 500
    ts = fleet.timestamp_ms
    assert np.all(np.diff(ts) >= 0)
    ties = np.flatnonzero(np.diff(ts) == 0)
    assert np.all(fleet.device[ties] < fleet.device[ties + 1])  # ties: device order
    start_ms = int(datetime(2025, 11, 7, tzinfo=UTC).timestamp() * 1000)
    assert start_ms <= ts[0] < start_ms + 10_000
    assert np.all(np.diff(_per_device(fleet, "timestamp_ms"), axis=1) == 10_000)


def test_device_id_width_grows_past_four_digits():
    arrays = synthetic_fleet_arrays(num_devices=12_345, readings_per_device=1)
    assert arrays.device_ids[0] == "device_00000" and arrays.device_ids[-1] == "device_12344"


def test_anomaly_rate_and_kinds(fleet):
    rate = fleet.label.mean()
    assert 0.012 < rate < 0.028, rate
    np.testing.assert_array_equal(fleet.label, (fleet.anomaly_kind > 0).astype(np.int8))
    kinds = Counter(fleet.anomaly_kind.tolist())
    assert set(kinds) == set(range(len(ANOMALY_KINDS)))  # every kind present
    high = synthetic_fleet_arrays(num_devices=300, readings_per_device=200, anomaly_rate=0.08)
    assert 0.05 < high.label.mean() < 0.11


def test_most_loud_anomalies_are_several_sigmas_off(fleet):
    values, kinds = _per_device(fleet, "value"), _per_device(fleet, "anomaly_kind")
    normal = np.where(kinds == 0, values, np.nan)
    z = np.abs(values - np.nanmean(normal, 1, keepdims=True)) / np.nanstd(normal, 1, keepdims=True)
    loud = np.isin(kinds, [ANOMALY_KINDS.index("spike"), ANOMALY_KINDS.index("level_shift")])
    assert np.mean(z[loud] > 2.5) > 0.8
    assert np.mean(z[kinds == 0] > 2.5) < 0.03
    stuck = kinds == ANOMALY_KINDS.index("stuck")
    flat = np.diff(values, axis=1)[stuck[:, 1:] & stuck[:, :-1]]
    assert flat.size and np.all(flat == 0)  # stuck stretches are exactly constant


def test_devices_are_not_identical(fleet):
    values, labels = _per_device(fleet, "value"), _per_device(fleet, "label")
    means, stds = values.mean(axis=1), values.std(axis=1)
    assert len(np.unique(means.round(6))) == 500 and len(np.unique(stds.round(6))) == 500
    assert means.max() / means.min() > 100  # levels spread over orders of magnitude
    per_device_rate = labels.mean(axis=1)
    assert per_device_rate.min() == 0 and per_device_rate.max() > 0.05  # non-IID anomaly load


def test_synthetic_fleet_yields_readings_matching_arrays():
    report = LoadReport()
    readings = list(synthetic_fleet(num_devices=20, readings_per_device=30, report=report))
    arrays = synthetic_fleet_arrays(num_devices=20, readings_per_device=30)
    assert report.rows == len(readings) == 600 and report.bad_rows == 0
    _assert_event_time_order(readings)
    assert [r.value for r in readings] == arrays.value.tolist()
    assert [r.label for r in readings] == arrays.label.tolist()
    assert readings[0].timestamp_ms == arrays.timestamp_ms[0]
    assert {r.device_id for r in readings} == set(arrays.device_ids)


def test_hundred_thousand_devices_quickly():
    started = time.perf_counter()
    arrays = synthetic_fleet_arrays(num_devices=100_000, readings_per_device=5)
    assert time.perf_counter() - started < 10
    assert len(arrays) == 500_000 and len(arrays.device_ids) == 100_000
    assert arrays.device_ids[-1] == "device_99999"
    assert np.all(np.diff(arrays.timestamp_ms) >= 0)


# ---------------------------------------------------------------------------- generic CSV


def test_csv_loader_sorts_parses_and_counts_bad_rows(tmp_path, caplog):
    path = tmp_path / "readings.csv"
    path.write_text(
        "device_id,value,timestamp,label\n"
        "b,2.5,2025-11-07T10:00:02Z,1\n"
        "a,1.0,2025-11-07 10:00:01,0\n"  # naive = UTC
        "a,3.0,1762509603,\n"  # epoch seconds = 10:00:03Z, empty label
        "c,4.0,2025-11-07T12:00:02+02:00,0\n"  # 10:00:02Z, ties with b: device order
        "a,5.0,not a time,0\n"
        "a,5.0,yesterday,0\n"
        "a,abc,2025-11-07T10:00:04Z,0\n"
        ",6.0,2025-11-07T10:00:05Z,0\n"
        "a,nan,2025-11-07T10:00:06Z,0\n"
        "a,7.0,2025-11-07T10:00:07Z,2\n"
        "a,8.0\n"
        "\n"
    )
    report = LoadReport()
    with caplog.at_level(logging.WARNING, logger="streaming.sources"):
        readings = list(csv_readings(path, report=report))
    assert [(r.device_id, r.value, r.label) for r in readings] == [
        ("a", 1.0, 0),
        ("b", 2.5, 1),
        ("c", 4.0, 0),
        ("a", 3.0, None),
    ]
    assert readings[-1].timestamp == datetime(2025, 11, 7, 10, 0, 3, tzinfo=UTC)
    assert report.rows == 4 and report.bad_rows == 7
    assert report.reasons == {
        "unparsable timestamp": 2,
        "unparsable value": 1,
        "missing device": 1,
        "non-finite value": 1,
        "unparsable label": 1,
        "wrong field count": 1,
    }
    assert report.as_dict()["reasons"]["unparsable timestamp"] == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 6  # one per reason, not one per bad row


def test_csv_without_label_column_and_missing_required_column(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("timestamp,device_id,value\n2025-11-07T10:00:00Z,x,1\n")
    assert [r.label for r in csv_readings(path)] == [None]
    empty = tmp_path / "empty.csv"
    empty.write_text("timestamp,device_id,value\n")
    report = LoadReport()
    assert list(csv_readings(empty, report=report)) == [] and report.rows == 0
    broken = tmp_path / "broken.csv"
    broken.write_text("timestamp,value\n2025-11-07T10:00:00Z,1\n")
    with pytest.raises(ValueError, match="device_id"):
        list(csv_readings(broken))


# ---------------------------------------------------------------------------- SKAB


@pytest.mark.skipif(not SKAB.is_dir(), reason=f"SKAB data not found at {SKAB}")
def test_skab_devices_counts_and_labels():
    files = skab_files(SKAB)
    labelled = [p for _, p in files if p.parent.name != "anomaly-free"]
    assert len(labelled) == 34 and len(files) == 35
    report = LoadReport()
    readings = list(skab_readings(SKAB, report=report))
    per_device = Counter(r.device_id for r in readings)
    assert len(per_device) == len(files) * 8
    assert "skab_valve1_3_Pressure" in per_device
    assert "skab_other_14_Volume_Flow_RateRMS" in per_device
    for experiment, path in files:
        lines = sum(1 for line in path.read_text().splitlines() if line.strip()) - 1
        assert per_device[f"skab_{experiment}_Current"] == lines, path
    assert report.rows == len(readings) and report.bad_rows == 0
    _assert_event_time_order(readings)
    labels = [r.label for r in readings if r.label is not None]
    assert 0.33 < sum(labels) / len(labels) < 0.37
    free = [r for r in readings if r.device_id.startswith("skab_anomaly_free_")]
    assert free and all(r.label is None for r in free)
    first = next(r for r in readings if r.device_id == "skab_valve1_0_Pressure")
    assert first.timestamp == datetime(2020, 3, 9, 10, 14, 33, tzinfo=UTC)
    assert first.value == pytest.approx(0.054711)


@pytest.mark.skipif(not SKAB.is_dir(), reason=f"SKAB data not found at {SKAB}")
def test_skab_without_anomaly_free_has_272_devices():
    devices = {r.device_id for r in skab_readings(SKAB, include_anomaly_free=False)}
    assert len(devices) == 34 * 8


# ---------------------------------------------------------------------------- WSN


@pytest.mark.skipif(not WSN.is_file(), reason=f"WSN data not found at {WSN}")
def test_wsn_readings():
    report = LoadReport()
    readings = list(wsn_readings(WSN, report=report))
    assert len(readings) == report.rows == 18_914 and report.bad_rows == 0
    assert {r.device_id for r in readings} == {f"wsn_mote_{i}" for i in range(1, 5)}
    share = sum(r.label for r in readings) / len(readings)
    assert 0.007 < share < 0.009
    assert {r.device_id for r in readings if r.label} == {"wsn_mote_1", "wsn_mote_4"}
    _assert_event_time_order(readings)
    assert readings[0].timestamp == datetime(2010, 1, 1, 0, 0, 5, tzinfo=UTC)  # reading 1
    humidity = next(iter(wsn_readings(WSN, field="humidity")))
    assert humidity.value == pytest.approx(45.93)
    with pytest.raises(ValueError):
        list(wsn_readings(WSN, field="label"))


# ---------------------------------------------------------------------------- Edge-IIoTset

EDGE_HEADER_LINE = (
    "frame.time,ip.src_host,ip.dst_host,arp.dst.proto_ipv4,arp.opcode,arp.hw.size,"
    "arp.src.proto_ipv4,icmp.checksum,icmp.seq_le,icmp.transmit_timestamp,icmp.unused,"
    "http.file_data,http.content_length,http.request.uri.query,http.request.method,"
    "http.referer,http.request.full_uri,http.request.version,http.response,http.tls_port,"
    "tcp.ack,tcp.ack_raw,tcp.checksum,tcp.connection.fin,tcp.connection.rst,"
    "tcp.connection.syn,tcp.connection.synack,tcp.dstport,tcp.flags,tcp.flags.ack,tcp.len,"
    "tcp.options,tcp.payload,tcp.seq,tcp.srcport,udp.port,udp.stream,udp.time_delta,"
    "dns.qry.name,dns.qry.name.len,dns.qry.qu,dns.qry.type,dns.retransmission,"
    "dns.retransmit_request,dns.retransmit_request_in,mqtt.conack.flags,"
    "mqtt.conflag.cleansess,mqtt.conflags,mqtt.hdrflags,mqtt.len,mqtt.msg_decoded_as,"
    "mqtt.msg,mqtt.msgtype,mqtt.proto_len,mqtt.protoname,mqtt.topic,mqtt.topic_len,"
    "mqtt.ver,mbtcp.len,mbtcp.trans_id,mbtcp.unit_id,Attack_label,Attack_type"
)
EDGE_HEADER = EDGE_HEADER_LINE.split(",")


def _edge_row(time_: str, src: str, tcp_len: str, label: str, kind: str, **extra: str):
    row = dict.fromkeys(EDGE_HEADER, "0.0")
    row.update({"frame.time": time_, "ip.src_host": src, "ip.dst_host": "192.168.0.128"})
    row.update({"tcp.len": tcp_len, "Attack_label": label, "Attack_type": kind, **extra})
    return [row[c] for c in EDGE_HEADER]


def test_edge_iiot_loader(tmp_path):
    rows = [
        _edge_row(" 2021 11:44:10.081753000 ", "192.168.0.128", "0.0", "0", "Normal"),
        _edge_row(" 2021 11:44:09.000001000 ", "192.168.0.101", "52.0", "1", "DDoS_TCP"),
        _edge_row("Nov 14, 2021 13:42:08.797669000 EET", "192.168.0.170", "10", "1", "XSS"),
        _edge_row(
            "2021 11:44:11.5",
            "192.168.0.101",
            "100.0",
            "1.0",
            "SQL_injection",
            **{"http.file_data": "a, quoted, field", "tcp.payload": "4745542f"},
        ),
        _edge_row("6.0", "192.168.0.101", "0.0", "1", "MITM"),  # column-shifted row
        _edge_row("192.168.0.133", "0", "0.0", "1", "DDoS_UDP"),  # column-shifted row
        _edge_row(" 2021 11:44:12.0 ", "0", "0.0", "0", "Normal"),  # no source host
        _edge_row(" 2021 11:44:13.0 ", "192.168.0.128", "n/a", "0", "Normal"),
        _edge_row(" 2021 11:44:14.0 ", "192.168.0.128", "1.0", "Normal", "Normal"),
        _edge_row(" 2021 25:61:14.0 ", "192.168.0.128", "1.0", "0", "Normal"),
    ]
    path = tmp_path / "DNN-EdgeIIoT-dataset.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(EDGE_HEADER)
        writer.writerows(rows)
        writer.writerow(["2021 11:44:15.0", "192.168.0.128"])  # truncated line
    report = LoadReport()
    readings = list(edge_iiot_readings(path, report=report))
    assert [(r.device_id, r.value, r.label) for r in readings] == [
        ("192.168.0.101", 52.0, 1),
        ("192.168.0.128", 0.0, 0),
        ("192.168.0.101", 100.0, 1),
        ("192.168.0.170", 10.0, 1),
    ]
    assert readings[0].timestamp == datetime(2021, 1, 1, 11, 44, 9, 1, tzinfo=UTC)
    assert readings[-1].timestamp == datetime(2021, 11, 14, 13, 42, 8, 797669, tzinfo=UTC)
    assert report.rows == 4 and report.bad_rows == 7
    assert report.reasons == {
        "unparsable timestamp": 3,
        "missing device": 1,
        "unparsable value": 1,
        "unparsable label": 1,
        "wrong field count": 1,
    }
    by_port = list(edge_iiot_readings(path, value_field="tcp.dstport"))
    assert [r.value for r in by_port] == [0.0] * 5  # the "n/a" tcp.len row is fine here


def test_edge_iiot_time_formats():
    assert parse_edge_iiot_time("2021-11-14T13:42:08Z") == int(
        datetime(2021, 11, 14, 13, 42, 8, tzinfo=UTC).timestamp() * 1_000_000
    )
    for bad in ("6.0", "192.168.0.1", "", "Foo 14, 2021 13:42:08.1 EET", "20211114"):
        with pytest.raises(ValueError):
            parse_edge_iiot_time(bad)


# ---------------------------------------------------------------------------- dispatcher


def test_open_source_dispatches_and_rejects_unknown(tmp_path):
    readings = list(open_source("synthetic", num_devices=3, readings_per_device=4))
    assert len(readings) == 12
    path = tmp_path / "r.csv"
    path.write_text("timestamp,device_id,value\n2025-11-07T10:00:00Z,x,1\n")
    assert len(list(open_source("csv", path=path))) == 1
    with pytest.raises(ValueError, match=r"csv.*edge_iiot.*skab.*synthetic.*wsn"):
        open_source("kafka")


@pytest.mark.skipif(not SKAB.is_dir(), reason=f"SKAB data not found at {SKAB}")
def test_open_source_takes_path_for_skab():
    first = next(open_source("skab", path=SKAB, include_anomaly_free=False))
    assert first.device_id.startswith("skab_")
