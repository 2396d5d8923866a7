"""Tests of streaming.sources: synthetic fleet, file loaders, bad-row accounting, dispatcher.

The file loaders are checked against pandas reading the same data independently (clean copies
of the rows, pandas' own parsers), so a loader bug and an oracle bug would have to agree.
"""

from __future__ import annotations

import csv
import logging
import random
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from streaming.messages import SINGLE_CHANNEL, Reading, decode_readings, encode_reading_batch
from streaming.sources import (
    ANOMALY_KINDS,
    EDGE_IIOT_NON_FEATURES,
    SHARED_DATA_DIR,
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

pd = pytest.importorskip("pandas")

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SKAB = DATA / "skab"
WSN = DATA / "wsn" / "data.csv"
SKAB_CHANNELS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume_Flow_RateRMS",
)
EPOCH = pd.Timestamp(0, tz="UTC")


def _assert_event_time_order(readings: list[Reading]) -> None:
    stamps = [r.timestamp_ms for r in readings]
    assert all(type(t) is int for t in stamps[:100])
    assert all(a <= b for a, b in pairwise(stamps))
    assert all(r.timestamp.tzinfo is not None for r in readings[:100])


def _ms(series) -> list[int]:
    """pandas datetimes (tz-aware UTC) -> epoch milliseconds (floor), independently of sources."""
    return ((series - EPOCH) // pd.Timedelta(milliseconds=1)).astype("int64").tolist()


def _as_tuples(readings: list[Reading]) -> list[tuple]:
    return [(r.device_id, r.timestamp_ms, r.values, r.label, r.channels) for r in readings]


def _oracle_tuples(frame, channels: tuple[str, ...], single: bool) -> list[tuple]:
    """Expected readings from a pandas frame with columns ts (UTC), device_id, label (Int64/NA),
    the channel columns, and pos (row position): sorted by time, device, position."""
    frame = frame.sort_values(["ts", "device_id", "pos"], kind="stable")
    values = frame[list(channels)].to_numpy(dtype=float).tolist()
    labels = [None if pd.isna(x) else int(x) for x in frame["label"]]
    return [
        (d, t, tuple(v), lab, SINGLE_CHANNEL if single else channels)
        for d, t, v, lab in zip(frame["device_id"], _ms(frame["ts"]), values, labels, strict=True)
    ]


def test_readings_from_every_loader_pass_the_stream_decoder(tmp_path):
    """Whatever a loader yields, the stream contract accepts: a loader never produces a dead
    letter. (Uses the synthetic fleet and the small CSV files of the tests below.)"""
    path = tmp_path / "wide.csv"
    path.write_text("timestamp,device_id,b,a\n2025-11-07T10:00:00Z,x,1,2\n")
    readings = list(synthetic_fleet(num_devices=5, readings_per_device=3)) + list(
        csv_readings(path)
    )
    assert decode_readings(encode_reading_batch(readings)) == readings


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
        "a,1e16,2025-11-07T10:00:08Z,0\n"
        "a,1.0,1960-01-01T00:00:00Z,0\n"
        "a,1.0,0001-01-01T00:00:00+01:00,0\n"
        "a,1.0,-5,0\n"
        "a\x01b,1.0,2025-11-07T10:00:09Z,0\n" + "x" * 129 + ",1.0,2025-11-07T10:00:09Z,0\n"
        "\n"
    )
    report = LoadReport()
    with caplog.at_level(logging.WARNING, logger="streaming.sources"):
        readings = list(csv_readings(path, report=report))
    assert [(r.device_id, r.value, r.label, r.channels) for r in readings] == [
        ("a", 1.0, 0, ("value",)),
        ("b", 2.5, 1, ("value",)),
        ("c", 4.0, 0, ("value",)),
        ("a", 3.0, None, ("value",)),
    ]
    assert readings[-1].timestamp == datetime(2025, 11, 7, 10, 0, 3, tzinfo=UTC)
    assert readings[-1].timestamp_ms == 1_762_509_603_000
    assert report.rows == 4 and report.bad_rows == 13
    assert report.reasons == {
        "unparsable timestamp": 2,
        "unparsable value": 1,
        "missing device": 1,
        "non-finite value": 1,
        "unparsable label": 1,
        "wrong field count": 1,
        "value out of range": 1,
        "timestamp out of range": 3,
        "invalid device id": 2,
    }
    assert report.as_dict()["reasons"]["unparsable timestamp"] == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 9  # one per reason, not one per bad row


@pytest.mark.parametrize("separator", [",", ";", "\t"])
def test_csv_in_other_spellings_of_separator_header_time_and_label(tmp_path, separator):
    # The same instant, 2025-11-07T10:00:03.250Z, as an epoch number in each unit; labels as
    # words in any case; the reserved column names capitalised.
    rows = [
        ("a", "1762509603.25", "true"),
        ("b", "1762509603250", "False"),
        ("c", "1762509603250000", "YES"),
        ("d", "1762509603250000000", "no"),
        ("e", "1762509603250000000000", "1"),  # beyond nanoseconds: out of range
    ]
    header = separator.join(["Device_ID", "Timestamp", "pressure", "temp", "LABEL"])
    lines = [separator.join([d, t, "1.5", "2.5", label]) for d, t, label in rows]
    path = tmp_path / "readings.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    report = LoadReport()
    readings = list(csv_readings(path, report=report))
    assert [(r.device_id, r.timestamp_ms, r.label) for r in readings] == [
        ("a", 1_762_509_603_250, 1),
        ("b", 1_762_509_603_250, 0),
        ("c", 1_762_509_603_250, 1),
        ("d", 1_762_509_603_250, 0),
    ]
    assert readings[0].channels == ("pressure", "temp") and readings[0].values == (1.5, 2.5)
    assert report.reasons == {"timestamp out of range": 1}


def test_csv_without_label_column_and_missing_required_column(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("timestamp,device_id,value\n2025-11-07T10:00:00Z,x,1\n")
    assert [(r.label, r.channels) for r in csv_readings(path)] == [(None, SINGLE_CHANNEL)]
    empty = tmp_path / "empty.csv"
    empty.write_text("timestamp,device_id,value\n")
    report = LoadReport()
    assert list(csv_readings(empty, report=report)) == [] and report.rows == 0
    broken = tmp_path / "broken.csv"
    broken.write_text("timestamp,value\n2025-11-07T10:00:00Z,1\n")
    with pytest.raises(ValueError, match="device_id"):
        list(csv_readings(broken))


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("timestamp,device_id,label", "no value or channel column"),
        ("timestamp,device_id,a,a", "more than once"),
        ("timestamp,device_id,a," + "n" * 65, "longer than 64"),
        ("timestamp,device_id,a,", "must not be empty"),
        ("timestamp,device_id," + ",".join(f"c{i}" for i in range(257)), "limit 256"),
    ],
)
def test_csv_header_problems_are_file_errors(tmp_path, header, problem):
    path = tmp_path / "bad_header.csv"
    path.write_text(header + "\n")
    with pytest.raises(ValueError, match=problem):
        list(csv_readings(path))


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _random_time(rng: random.Random) -> tuple[str, str]:
    """A timestamp in one of the accepted spellings, and the same instant in a form pandas reads
    without help (ISO 8601 with an offset)."""
    base = datetime(2025, 11, 7, 10, 0, tzinfo=UTC).timestamp() + rng.randrange(0, 600)
    ms = rng.choice([0, 0, 250, 999])
    instant = pd.Timestamp(int(base * 1000) + ms, unit="ms", tz="UTC")
    iso = instant.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    spelling = rng.choice(["z", "naive", "space", "offset"])
    if spelling == "z":
        text = iso + "Z"
    elif spelling == "naive":
        text = iso
    elif spelling == "space":
        text = iso.replace("T", " ")
    else:
        text = instant.tz_convert("Asia/Kolkata").isoformat()
    return text, instant.isoformat()


NARROW_BAD = [  # rows of a narrow file the loader must count, with their reasons
    (["2025-11-07T10:00:00Z", "dev1", "1,5", "0"], "unparsable value"),
    (["2025-11-07T10:00:00Z", "dev1", "inf", "0"], "non-finite value"),
    (["2025-11-07T10:00:00Z", "", "1.0", "0"], "missing device"),
    (["2025-11-07T25:00:00Z", "dev1", "1.0", "0"], "unparsable timestamp"),
    (["2025-11-07T10:00:00Z", "dev1", "1.0", "2"], "unparsable label"),
    (["2025-11-07T10:00:00Z", "dev1", "1.0", "maybe"], "unparsable label"),
    (["2025-11-07T10:00:00Z", "dev1", "1.0", "0", "extra"], "wrong field count"),
    (["2025-11-07T10:00:00Z", "dev1"], "wrong field count"),
]


def test_narrow_csv_matches_pandas(tmp_path):
    rng = random.Random(7)
    good, oracle_rows = [], []
    for _ in range(400):
        text, iso = _random_time(rng)
        value = rng.choice([f"{rng.gauss(20, 5):.6f}", str(rng.randrange(-50, 50)), "1.5e3"])
        label = rng.choice(["", "0", "1", "1.0"])
        device = f"dev{rng.randrange(12)}"
        good.append([text, device, value, label])
        oracle_rows.append([iso, device, value, label])
    dirty = list(good)
    for i, (row, _reason) in enumerate(NARROW_BAD):
        dirty.insert(37 * i + 5, row)
    header = ["timestamp", "device_id", "value", "label"]
    _write_rows(tmp_path / "dirty.csv", header, dirty)
    _write_rows(tmp_path / "clean.csv", header, oracle_rows)

    report = LoadReport()
    got = list(csv_readings(tmp_path / "dirty.csv", report=report))
    frame = pd.read_csv(tmp_path / "clean.csv", float_precision="round_trip")
    frame["ts"] = pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601")
    frame["label"] = frame["label"].astype("Int64")
    frame["pos"] = range(len(frame))
    assert _as_tuples(got) == _oracle_tuples(frame, ("value",), single=True)
    assert report.rows == 400 and report.bad_rows == len(NARROW_BAD)
    assert report.reasons == Counter(reason for _, reason in NARROW_BAD)
    _assert_event_time_order(got)


def test_wide_csv_matches_pandas(tmp_path):
    rng = random.Random(11)
    header = ["device_id", "temp", "timestamp", "pressure", "label", "hum"]  # any column order
    good, oracle_rows = [], []
    for _ in range(300):
        text, iso = _random_time(rng)
        values = [f"{rng.uniform(-1e3, 1e3):.4f}" for _ in range(3)]
        device = rng.choice(["pump-1", "pump-2", "valve ☃"])
        label = rng.choice(["", "0", "1"])
        good.append([device, values[0], text, values[1], label, values[2]])
        oracle_rows.append([device, values[0], iso, values[1], label, values[2]])
    bad = [
        (["pump-1", "1.0", "2025-11-07T10:00:00Z", "", "0", "2.0"], "unparsable value"),
        (["pump-1", "1.0", "2025-11-07T10:00:00Z", "2.0", "0", "n/a"], "unparsable value"),
        (["pump-1", "1.0", "2025-11-07T10:00:00Z", "NaN", "0", "2.0"], "non-finite value"),
        (["pump-1", "1.0", "2025-11-07T10:00:00Z", "-2e15", "0", "2.0"], "value out of range"),
        (["", "1.0", "2025-11-07T10:00:00Z", "2.0", "0", "2.0"], "missing device"),
        (["pump-1", "1.0", "2025-11-07T10:00:00Z", "2.0", "0"], "wrong field count"),
    ]
    dirty = list(good)
    for i, (row, _reason) in enumerate(bad):
        dirty.insert(41 * i + 3, row)
    _write_rows(tmp_path / "dirty.csv", header, dirty)
    _write_rows(tmp_path / "clean.csv", header, oracle_rows)

    report = LoadReport()
    got = list(csv_readings(tmp_path / "dirty.csv", report=report))
    frame = pd.read_csv(tmp_path / "clean.csv", float_precision="round_trip")
    frame["ts"] = pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601")
    frame["label"] = frame["label"].astype("Int64")
    frame["pos"] = range(len(frame))
    channels = ("hum", "pressure", "temp")
    assert {r.channels for r in got} == {channels}
    assert _as_tuples(got) == _oracle_tuples(frame, channels, single=False)
    assert report.rows == 300 and report.bad_rows == len(bad)
    assert report.reasons == Counter(reason for _, reason in bad)


def test_wide_csv_with_a_value_column_among_others_is_wide(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("timestamp,device_id,value,temp\n2025-11-07T10:00:00Z,x,1,2\n")
    [reading] = csv_readings(path)
    assert reading.channels == ("temp", "value") and reading.values == (2.0, 1.0)
    one = tmp_path / "one.csv"
    one.write_text("timestamp,device_id,temp\n2025-11-07T10:00:00Z,x,3\n")
    [reading] = csv_readings(one)
    assert reading.channels == ("temp",) and reading.value == 3.0


def test_csv_survives_a_line_the_csv_module_cannot_read(tmp_path):
    path = tmp_path / "huge_field.csv"
    path.write_text(
        "timestamp,device_id,value\n"
        "2025-11-07T10:00:00Z,x,1\n"
        f'2025-11-07T10:00:01Z,x,"{"9" * 200_000}"\n'
        "2025-11-07T10:00:02Z,x,3\n"
    )
    report = LoadReport()
    readings = list(csv_readings(path, report=report))
    assert [r.value for r in readings] == [1.0, 3.0]
    assert report.reasons == {"unreadable line": 1}


def test_csv_with_invalid_utf8_costs_only_its_row(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(
        b"timestamp,device_id,value\n"
        b"2025-11-07T10:00:00Z,x,1\n"
        b"2025-11-07T10:00:01Z,x,2\xe9\n"
        b"2025-11-07T10:00:02Z,x,3\n"
    )
    report = LoadReport()
    assert [r.value for r in csv_readings(path, report=report)] == [1.0, 3.0]
    assert report.reasons == {"unparsable value": 1}


def test_csv_two_hundred_thousand_rows_quickly_and_like_pandas(tmp_path):
    n = 200_000
    rng = np.random.default_rng(3)
    seconds = 1_762_509_600 + rng.integers(0, 3_600, n)
    frame = pd.DataFrame(
        {
            "timestamp": pd.to_datetime(seconds, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device_id": np.char.add("device_", rng.integers(0, 2_000, n).astype(str)),
            "vibration": rng.normal(0, 1, n).round(6),
            "current": rng.normal(5, 2, n).round(4),
            "label": rng.integers(0, 2, n),
        }
    )
    path = tmp_path / "big.csv"
    frame.to_csv(path, index=False)
    started = time.perf_counter()
    report = LoadReport()
    got = list(csv_readings(path, report=report))
    elapsed = time.perf_counter() - started
    assert elapsed < 8, f"{elapsed:.1f} s for {n} rows"
    assert report.rows == n and report.bad_rows == 0
    oracle = pd.read_csv(path, float_precision="round_trip")
    oracle["ts"] = pd.to_datetime(oracle["timestamp"], utc=True)
    oracle["pos"] = range(n)
    assert _as_tuples(got) == _oracle_tuples(oracle, ("current", "vibration"), single=False)


# ---------------------------------------------------------------------------- SKAB

needs_skab = pytest.mark.skipif(not SKAB.is_dir(), reason=f"SKAB data not found at {SKAB}")


@pytest.fixture(scope="module")
def skab_multivariate():
    report = LoadReport()
    return list(skab_readings(SKAB, report=report)), report


@needs_skab
def test_skab_default_is_one_multivariate_device_per_experiment(skab_multivariate):
    readings, report = skab_multivariate
    files = skab_files(SKAB)
    labelled = [p for _, p in files if p.parent.name != "anomaly-free"]
    assert len(labelled) == 34 and len(files) == 35
    assert SHARED_DATA_DIR.resolve() == SKAB.parent.resolve()
    by_device = defaultdict(list)
    for r in readings:
        by_device[r.device_id].append(r)
    assert set(by_device) == {f"skab_{experiment}" for experiment, _ in files}
    assert {"skab_valve1_3", "skab_other_14", "skab_anomaly_free"} <= set(by_device)
    assert {r.channels for r in readings} == {SKAB_CHANNELS}
    assert report.rows == len(readings) and report.bad_rows == 0
    _assert_event_time_order(readings)
    for experiment, path in files:  # each file against pandas' reading of it
        frame = pd.read_csv(path, sep=";", float_precision="round_trip")
        frame.columns = [c.replace(" ", "_") for c in frame.columns]
        frame["ts"] = pd.to_datetime(frame["datetime"]).dt.tz_localize("UTC")
        frame = frame.sort_values("ts", kind="stable")
        got = by_device[f"skab_{experiment}"]
        assert [r.timestamp_ms for r in got] == _ms(frame["ts"]), path
        np.testing.assert_array_equal(
            np.array([r.values for r in got]), frame[list(SKAB_CHANNELS)].to_numpy(), str(path)
        )
        expected = [None] * len(frame) if "anomaly" not in frame else frame["anomaly"].astype(int)
        assert [r.label for r in got] == list(expected), path
    labels = [r.label for r in readings if r.label is not None]
    assert 0.33 < sum(labels) / len(labels) < 0.37
    first = by_device["skab_valve1_0"][0]
    assert first.timestamp == datetime(2020, 3, 9, 10, 14, 33, tzinfo=UTC)
    assert dict(zip(first.channels, first.values, strict=True))["Pressure"] == 0.054711
    with pytest.raises(ValueError):
        _ = first.value


@needs_skab
def test_skab_per_sensor_keeps_one_device_per_experiment_and_sensor(skab_multivariate):
    multivariate, _ = skab_multivariate
    report = LoadReport()
    readings = list(open_source("skab", path=SKAB, per_sensor=True, report=report))
    per_device = Counter(r.device_id for r in readings)
    assert len(per_device) == 35 * 8
    assert "skab_valve1_3_Pressure" in per_device
    assert "skab_other_14_Volume_Flow_RateRMS" in per_device
    assert {r.channels for r in readings} == {SINGLE_CHANNEL}
    assert report.rows == len(readings) == 8 * len(multivariate) and report.bad_rows == 0
    _assert_event_time_order(readings)
    # The same numbers as the multivariate readings, sensor by sensor.
    pressure = [r.value for r in readings if r.device_id == "skab_valve2_1_Pressure"]
    assert pressure == [
        r.values[SKAB_CHANNELS.index("Pressure")]
        for r in multivariate
        if r.device_id == "skab_valve2_1"
    ]
    free = [r for r in readings if r.device_id.startswith("skab_anomaly_free_")]
    assert free and all(r.label is None for r in free)
    devices = {r.device_id for r in skab_readings(SKAB, include_anomaly_free=False)}
    assert len(devices) == 34


def test_skab_bad_fields_cost_a_row_or_a_reading(tmp_path):
    folder = tmp_path / "valve1"
    folder.mkdir()
    header = "datetime;Accelerometer1RMS;Current;Volume Flow RateRMS;anomaly;changepoint\n"
    (folder / "0.csv").write_text(
        header + "2020-03-09 10:14:33;0.1;1.5;32.0;0.0;0.0\n"
        "2020-03-09 10:14:34;0.2;oops;32.5;1.0;0.0\n"
        "2020-03-09 10:14:35;0.3;1.7\n"
        "not a time;0.3;1.7;33.0;0.0;0.0\n"
        "2020-03-09 10:14:36;0.4;1.8;33.5;1.0;0.0\n"
    )
    report = LoadReport()
    readings = list(skab_readings(tmp_path, report=report))
    assert [(r.device_id, r.values, r.label) for r in readings] == [
        ("skab_valve1_0", (0.1, 1.5, 32.0), 0),
        ("skab_valve1_0", (0.4, 1.8, 33.5), 1),
    ]
    assert readings[0].channels == ("Accelerometer1RMS", "Current", "Volume_Flow_RateRMS")
    assert report.reasons == {
        "unparsable value": 1,
        "wrong field count": 1,
        "unparsable timestamp": 1,
    }
    report = LoadReport()
    per_sensor = list(skab_readings(tmp_path, report=report, per_sensor=True))
    assert len(per_sensor) == 3 + 2 + 3  # the "oops" row keeps its two good sensors
    assert report.reasons == {
        "unparsable value": 1,
        "wrong field count": 3,
        "unparsable timestamp": 3,
    }


# ---------------------------------------------------------------------------- WSN

needs_wsn = pytest.mark.skipif(not WSN.is_file(), reason=f"WSN data not found at {WSN}")


@needs_wsn
def test_wsn_readings_match_pandas():
    report = LoadReport()
    readings = list(wsn_readings(WSN, report=report))
    assert len(readings) == report.rows == 18_914 and report.bad_rows == 0
    assert {r.device_id for r in readings} == {f"wsn_mote_{i}" for i in range(1, 5)}
    assert {r.channels for r in readings} == {("humidity", "temperature")}
    _assert_event_time_order(readings)
    frame = pd.read_csv(WSN, float_precision="round_trip")
    frame["device_id"] = "wsn_mote_" + frame["mote_id"].astype(str)
    frame["ts"] = pd.Timestamp("2010-01-01", tz="UTC") + pd.to_timedelta(frame["reading"] * 5, "s")
    frame["pos"] = range(len(frame))
    assert _as_tuples(readings) == _oracle_tuples(frame, ("humidity", "temperature"), False)
    share = sum(r.label for r in readings) / len(readings)
    assert 0.007 < share < 0.009
    assert {r.device_id for r in readings if r.label} == {"wsn_mote_1", "wsn_mote_4"}
    assert readings[0].timestamp == datetime(2010, 1, 1, 0, 0, 5, tzinfo=UTC)  # reading 1


@needs_wsn
def test_wsn_one_field_is_univariate():
    humidity = list(wsn_readings(WSN, field="humidity"))
    assert humidity[0].value == pytest.approx(45.93) and humidity[0].channels == SINGLE_CHANNEL
    both = list(wsn_readings(WSN))
    assert [r.value for r in humidity] == [r.values[0] for r in both]
    assert [r.value for r in wsn_readings(WSN, field="temperature")] == [r.values[1] for r in both]
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


EDGE_CHANNELS = tuple(sorted(c for c in EDGE_HEADER if c not in EDGE_IIOT_NON_FEATURES))


def _edge_file(tmp_path) -> Path:
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
            **{"http.file_data": "a, quoted, field", "tcp.payload": "4745542f", "mqtt.len": "7"},
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
    return path


def test_edge_iiot_loader_default_is_multichannel(tmp_path):
    path = _edge_file(tmp_path)
    report = LoadReport()
    readings = list(edge_iiot_readings(path, report=report))
    assert len(EDGE_CHANNELS) == 42 and "tcp.len" in EDGE_CHANNELS
    assert "http.request.method" not in EDGE_CHANNELS and "Attack_label" not in EDGE_CHANNELS
    assert {r.channels for r in readings} == {EDGE_CHANNELS}
    tcp_len, mqtt_len = EDGE_CHANNELS.index("tcp.len"), EDGE_CHANNELS.index("mqtt.len")
    assert [(r.device_id, r.values[tcp_len], r.values[mqtt_len], r.label) for r in readings] == [
        ("192.168.0.101", 52.0, 0.0, 1),
        ("192.168.0.128", 0.0, 0.0, 0),
        ("192.168.0.101", 100.0, 7.0, 1),
        ("192.168.0.170", 10.0, 0.0, 1),
    ]
    assert readings[0].timestamp_ms == 1_609_501_449_000  # 2021-01-01T11:44:09.000001 floored
    assert readings[-1].timestamp == datetime(2021, 11, 14, 13, 42, 8, 797000, tzinfo=UTC)
    assert report.rows == 4 and report.bad_rows == 7
    assert report.reasons == {
        "unparsable timestamp": 3,
        "missing device": 1,
        "unparsable value": 1,
        "unparsable label": 1,
        "wrong field count": 1,
    }
    # pandas on the same file: the four good rows' channels, in file order 2, 1, 4, 3.
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    good = frame.iloc[[1, 0, 3, 2]]
    expected = good[list(EDGE_CHANNELS)].astype(float).to_numpy()
    np.testing.assert_array_equal(np.array([r.values for r in readings]), expected)


def test_edge_iiot_value_field_is_univariate(tmp_path):
    path = _edge_file(tmp_path)
    report = LoadReport()
    by_len = list(edge_iiot_readings(path, value_field="tcp.len", report=report))
    assert [(r.device_id, r.value, r.label) for r in by_len] == [
        ("192.168.0.101", 52.0, 1),
        ("192.168.0.128", 0.0, 0),
        ("192.168.0.101", 100.0, 1),
        ("192.168.0.170", 10.0, 1),
    ]
    assert {r.channels for r in by_len} == {SINGLE_CHANNEL} and report.bad_rows == 7
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
    assert len(list(open_source("csv", path=path, per_sensor=False))) == 1
    with pytest.raises(ValueError, match="skab"):
        open_source("csv", path=path, per_sensor=True)
    with pytest.raises(ValueError, match=r"csv.*edge_iiot.*skab.*synthetic.*wsn"):
        open_source("kafka")


@needs_skab
def test_open_source_takes_path_for_skab():
    first = next(open_source("skab", path=SKAB, include_anomaly_free=False))
    assert first.device_id.startswith("skab_") and first.channels == SKAB_CHANNELS
