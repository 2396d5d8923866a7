"""The model topics' contracts: LocalRound and GlobalParams through encode/decode, and hostile
payloads that must raise InvalidMessage and nothing else."""

from __future__ import annotations

import base64
import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming.learner import HISTOGRAMS, STATISTICS, Anomaly, GlobalParams, LocalRound
from streaming.messages import (
    InvalidMessage,
    decode_anomaly,
    decode_global_params,
    decode_local_round,
    encode_anomaly,
    encode_global_params,
    encode_local_round,
)
from streaming.model.detectors import LOGIT_EDGES, NORMAL_EDGES, Network, NormalStats
from streaming.model.features import N_FEATURES, N_POOLED
from streaming.model.metrics import Confusion

TS = 1_762_473_601_592  # 2025-11-07T00:00:01.592Z
KEY = "test-signing-key"


def local_round(**overrides) -> LocalRound:
    rng = np.random.default_rng(0)
    net = Network(N_POOLED, 4)
    fields = {
        "device_id": "plc-7/line 2",
        "round": 12,
        "base_version": 5,
        "params": rng.normal(size=net.size),
        "samples": 50,
        "label_source": "pseudo",
        "loss": 0.3125,
        "accuracy": 0.94,
        "normal": NormalStats.of(rng.uniform(0, 3, size=(40, N_FEATURES))),
        "hist_pos": rng.integers(0, 5, LOGIT_EDGES.size + 1),
        "hist_neg": rng.integers(0, 50, LOGIT_EDGES.size + 1),
        "hist_normal": rng.integers(0, 50, NORMAL_EDGES.size + 1),
        "hist_normal_pos": rng.integers(0, 5, NORMAL_EDGES.size + 1),
        "hist_normal_neg": rng.integers(0, 40, NORMAL_EDGES.size + 1),
        "scored_version": 4,
        "prequential": Confusion(3, 1, 40, 2),
        "timestamp_ms": TS,
        "anomalous": NormalStats.of(rng.uniform(2, 9, size=(6, N_FEATURES))),
        "pseudo_normal": NormalStats.of(rng.uniform(-1, 2, size=(4, N_FEATURES))),
        "pseudo_anomalous": NormalStats.of(rng.uniform(1, 6, size=(3, N_FEATURES))),
        "hist_disc_pos": rng.integers(0, 5, LOGIT_EDGES.size + 1),
        "hist_disc_neg": rng.integers(0, 50, LOGIT_EDGES.size + 1),
    }
    fields.update(overrides)
    return LocalRound(**fields)


def global_params(**overrides) -> GlobalParams:
    rng = np.random.default_rng(1)
    hidden = overrides.pop("hidden", 4)
    fields = {
        "version": 17,
        "hidden": hidden,
        "params": rng.normal(size=Network(N_POOLED, hidden).size),
        "threshold": -1.25,
        "normal": NormalStats.of(rng.uniform(0, 3, size=(60, N_FEATURES))),
        "normal_threshold": 2.5,
        "label_source": "ground_truth",
        "detector": "label_free",
        "discriminant": rng.normal(size=N_FEATURES + 1),
        "discriminant_threshold": 0.75,
    }
    fields.update(overrides)
    return GlobalParams(**fields)


def decode_global(payload) -> GlobalParams:
    """``decode_global_params`` with the tests' key (for the tables of decoders)."""
    return decode_global_params(payload, KEY)


def assert_normal_equal(a: NormalStats, b: NormalStats) -> None:
    assert a.count == b.count
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.comoment, b.comoment)


def assert_local_equal(a: LocalRound, b: LocalRound) -> None:
    for name in (
        "device_id",
        "round",
        "base_version",
        "samples",
        "label_source",
        "loss",
        "accuracy",
        "scored_version",
        "prequential",
        "timestamp_ms",
        "since_ms",
    ):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("params", *HISTOGRAMS):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in STATISTICS:
        assert_normal_equal(getattr(a, name), getattr(b, name))


def assert_global_equal(a: GlobalParams, b: GlobalParams) -> None:
    for name in (
        "version",
        "hidden",
        "threshold",
        "normal_threshold",
        "label_source",
        "detector",
        "discriminant_threshold",
        "discriminant_labels",
    ):
        assert getattr(a, name) == getattr(b, name), name
    np.testing.assert_array_equal(a.params, b.params)
    if a.discriminant is None or b.discriminant is None:
        assert a.discriminant is None and b.discriminant is None
    else:
        np.testing.assert_array_equal(a.discriminant, b.discriminant)
    assert_normal_equal(a.normal, b.normal)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"base_version": 0, "scored_version": 0, "label_source": "ground_truth"},
        {"params": np.zeros(N_POOLED + 1), "normal": NormalStats.empty()},
        {"timestamp_ms": 0, "device_id": "é-ü-device"},
        {"since_ms": 1_762_473_600_123},
        {"anomalous": NormalStats.empty(), "prequential": Confusion(0, 0, 0, 0)},
    ],
)
def test_local_round_round_trip(overrides):
    original = local_round(**overrides)
    payload = encode_local_round(original)
    assert isinstance(payload, bytes)
    assert_local_equal(decode_local_round(payload), original)
    assert_local_equal(decode_local_round(payload.decode()), original)


def test_a_local_round_without_its_state_start_decodes_with_zero():
    # state_since_ms joined the contract later: an older learner's round is still valid.
    payload = json.loads(encode_local_round(local_round(since_ms=5)))
    assert payload["state_since_ms"] == 5
    del payload["state_since_ms"]
    assert decode_local_round(json.dumps(payload)).since_ms == 0
    for bad in (-1, 1.5, "5", None):
        payload["state_since_ms"] = bad
        with pytest.raises(InvalidMessage, match="state_since_ms"):
            decode_local_round(json.dumps(payload))


def test_a_round_without_anomalies_leaves_their_statistics_out():
    # Most rounds see no anomaly: N + N² zeros per round would be wire for nothing.
    empty = NormalStats.empty()
    blocks = ("anomalous", "pseudo_normal", "pseudo_anomalous")
    sent = json.loads(encode_local_round(local_round(**dict.fromkeys(blocks, empty))))
    assert not set(blocks) & set(sent)
    full = json.loads(encode_local_round(local_round()))
    assert [full[name]["count"] for name in blocks] == [6.0, 4.0, 3.0]


def test_a_local_round_of_an_older_learner_decodes_without_the_discriminant_fields():
    payload = json.loads(encode_local_round(local_round()))
    del payload["anomalous"], payload["pseudo_normal"], payload["pseudo_anomalous"]
    del payload["scores"]["discriminant_positives"], payload["scores"]["discriminant_negatives"]
    decoded = decode_local_round(json.dumps(payload))
    assert decoded.anomalous.count == decoded.pseudo_normal.count == 0
    assert decoded.pseudo_anomalous.count == 0
    assert decoded.hist_disc_pos.sum() == decoded.hist_disc_neg.sum() == 0
    payload["anomalous"] = {"count": 1.0, "mean": [0.0]}  # present, it must be whole
    with pytest.raises(InvalidMessage, match=f"mean must have {N_FEATURES} numbers"):
        decode_local_round(json.dumps(payload))


def test_a_local_round_of_an_older_learner_with_candidate_counts_decodes_without_them():
    # Per-detector counts left the contract: a round that still carries them decodes as the
    # same round without them.
    original = local_round()
    payload = json.loads(encode_local_round(original))
    assert "candidates" not in payload["scores"]
    payload["scores"]["candidates"] = {
        "zscore": {"tp": 2, "fp": 5, "tn": 36, "fn": 3},
        "supervised": {"tp": 3, "fp": 1, "tn": 40, "fn": 2},
    }
    assert_local_equal(decode_local_round(json.dumps(payload)), original)
    assert_local_equal(decode_local_round(json.dumps(payload).encode()), original)


def test_a_local_round_without_labelled_normal_histograms_decodes_with_zeros():
    # The two histograms joined the contract later: an older learner's round is still valid.
    payload = json.loads(encode_local_round(local_round()))
    del payload["scores"]["normal_positives"], payload["scores"]["normal_negatives"]
    decoded = decode_local_round(json.dumps(payload))
    assert decoded.hist_normal_pos.sum() == decoded.hist_normal_neg.sum() == 0
    payload["scores"]["normal_positives"] = [1, 2]  # present, it must be whole
    with pytest.raises(InvalidMessage, match="normal_positives"):
        decode_local_round(json.dumps(payload))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "threshold": None,
            "normal_threshold": None,
            "detector": "zscore",
            "label_source": "pseudo",
        },
        {"hidden": 0, "normal": NormalStats.empty(), "detector": "supervised"},
        {"discriminant": None, "discriminant_threshold": None},
        {"detector": "discriminant"},
        {"detector": "discriminant", "discriminant_labels": "pseudo"},
    ],
)
def test_global_params_round_trip(overrides):
    original = global_params(**overrides)
    payload = encode_global_params(original, TS, key=KEY, num_devices=3, strategy="fedavg")
    assert_global_equal(decode_global_params(payload, KEY), original)
    obj = json.loads(payload)
    assert obj["num_devices"] == 3 and obj["timestamp"] == "2025-11-07T00:00:01.592Z"


def test_global_params_of_a_large_fleet_round_trip():
    rng = np.random.default_rng(2)
    rows = rng.uniform(0, 10, size=(2_000, N_FEATURES))  # features lie in [0, CAP]
    big = NormalStats.of(rows).scaled(100.0)  # the same distribution over 200,000 rows
    original = global_params(normal=big)
    assert_global_equal(
        decode_global_params(encode_global_params(original, TS, key=KEY), KEY), original
    )


# --------------------------------------------------------------------------------------------
# Signatures: only the FedAvg service's versions are adopted
# --------------------------------------------------------------------------------------------


def signed_obj(**overrides) -> dict:
    return json.loads(encode_global_params(global_params(**overrides), TS, key=KEY))


def test_a_version_carries_an_hmac_sha256_signature():
    obj = signed_obj()
    assert obj["signature"].startswith("hmac-sha256:") and len(obj["signature"]) == 12 + 64
    # Another key signs the same content differently.
    other = json.loads(encode_global_params(global_params(), TS, key="another key"))
    assert other["signature"] != obj["signature"]


def test_an_unsigned_version_is_refused():
    obj = signed_obj()
    del obj["signature"]
    with pytest.raises(InvalidMessage, match="unsigned global model"):
        decode_global_params(json.dumps(obj), KEY)


def test_a_version_signed_with_another_key_is_refused():
    payload = encode_global_params(global_params(version=10**9), TS, key="attacker's key")
    with pytest.raises(InvalidMessage, match="badly signed"):
        decode_global_params(payload, KEY)


@pytest.mark.parametrize(
    "path, value",
    [
        (("version",), 10**9),
        (("hidden",), 4),  # unchanged: control (see below)
        (("weights", 0), 123.0),
        (("threshold",), -1.5),
        (("threshold",), None),
        (("normal_threshold",), 0.0),
        (("normal", "count"), 1.0),
        (("normal", "mean", 3), 9.0),
        (("normal", "comoment"), "upper triangle entry 7 = 4.0"),
        (("label_source",), "pseudo"),
        (("detector",), "zscore"),
        (("discriminant", 2), 5.0),
        (("discriminant",), None),
        (("discriminant_threshold",), -0.5),
        (("discriminant_labels",), "pseudo"),
    ],
)
def test_changing_anything_a_device_uses_breaks_the_signature(path, value):
    obj = signed_obj()
    target = obj
    for key in path[:-1]:
        target = target[key]
    if path == ("normal", "comoment"):  # base64 of the upper triangle's float64s
        upper = np.frombuffer(base64.b64decode(target["comoment"]), "<f8").copy()
        upper[7] = 4.0
        value = base64.b64encode(upper.tobytes()).decode()
    unchanged = target[path[-1]] == value
    target[path[-1]] = value
    if unchanged:
        assert decode_global_params(json.dumps(obj), KEY).version == 17
    else:
        with pytest.raises(InvalidMessage, match="badly signed"):
            decode_global_params(json.dumps(obj), KEY)


def test_a_version_without_a_normal_model_leaves_the_block_out_and_is_signed_so():
    bare = global_params(normal=NormalStats.empty(), normal_threshold=None)
    payload = encode_global_params(bare, TS, key=KEY)
    obj = json.loads(payload)
    assert "normal" not in obj
    assert len(payload) * 2 < len(encode_global_params(global_params(), TS, key=KEY))
    decoded = decode_global_params(payload, KEY)
    assert decoded.normal.count == 0 and decoded.normal.mean.shape == (N_FEATURES,)
    # A normal model added on the way is not the signed version.
    obj["normal"] = json.loads(encode_global_params(global_params(), TS, key=KEY))["normal"]
    with pytest.raises(InvalidMessage, match="badly signed"):
        decode_global_params(json.dumps(obj), KEY)


def test_a_version_from_before_the_discriminant_labels_decodes_as_the_streams():
    # Signed before the field existed: its signature covers no labels, and it still verifies.
    obj = signed_obj()
    del obj["discriminant_labels"]
    assert decode_global_params(json.dumps(obj), KEY).discriminant_labels == "ground_truth"
    # The rule's classes are signed: the field cannot be dropped from such a version.
    obj = signed_obj(discriminant_labels="pseudo")
    assert decode_global_params(json.dumps(obj), KEY).discriminant_labels == "pseudo"
    del obj["discriminant_labels"]
    with pytest.raises(InvalidMessage, match="badly signed"):
        decode_global_params(json.dumps(obj), KEY)


def test_bookkeeping_fields_and_json_spelling_do_not_affect_the_signature():
    obj = signed_obj()
    obj["num_devices"], obj["strategy"], obj["timestamp"] = 99, "median", "2030-01-01T00:00:00Z"
    # The same numbers spelled differently (an integer for a float, keys reordered).
    obj["normal"]["count"] = int(obj["normal"]["count"])
    text = json.dumps(dict(reversed(list(obj.items()))), indent=1)
    assert_global_equal(decode_global_params(text, KEY), global_params())


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "hmac-sha256:",
        "hmac-sha256:" + "0" * 64,
        "sha1:" + "0" * 64,
        "hmac-sha256:" + "é" * 64,
        42,
        ["hmac-sha256:" + "0" * 64],
        {"value": "x"},
    ],
)
def test_malformed_signatures_are_refused(signature):
    obj = signed_obj()
    obj["signature"] = signature
    with pytest.raises(InvalidMessage, match=r"signature|signed"):
        decode_global_params(json.dumps(obj), KEY)


def test_the_key_is_required_and_must_not_be_empty():
    payload = encode_global_params(global_params(), TS, key=KEY)
    with pytest.raises(TypeError):
        decode_global_params(payload)  # a caller's mistake, not a bad message
    with pytest.raises(ValueError):
        encode_global_params(global_params(), TS, key="")
    with pytest.raises(InvalidMessage, match="cannot verify"):
        decode_global_params(payload, b"")
    with pytest.raises(TypeError):
        encode_global_params(global_params(), TS)  # no key: nothing unsigned is produced


def test_stored_versions_decode_without_the_key():
    from streaming.messages import decode_stored_global_params

    payload = encode_global_params(global_params(), TS, key=KEY)
    assert_global_equal(decode_stored_global_params(payload), global_params())
    with pytest.raises(InvalidMessage):
        decode_stored_global_params(b'{"version": 1}')


# --------------------------------------------------------------------------------------------
# Hostile payloads
# --------------------------------------------------------------------------------------------


def local_obj() -> dict:
    return json.loads(encode_local_round(local_round()))


def global_obj() -> dict:
    return json.loads(encode_global_params(global_params(), TS, key=KEY))


def set_path(obj: dict, path: tuple, value) -> dict:
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


def deep(n: int) -> str:
    return "[" * n + "]" * n


TRIANGLE = N_FEATURES * (N_FEATURES + 1) // 2


def triangle(values: list[float]) -> str:
    """Base64 of float64s, written here with the standard library (the contract's form of an
    upper triangle), not with the module under test."""
    return base64.b64encode(struct.pack(f"<{len(values)}d", *values)).decode()


LOCAL_MUTATIONS = {
    "huge weight": (("weights",), [1e308, 0.0]),
    "weight beyond limit": (("weights",), [1e7]),
    "empty weights": (("weights",), []),
    "string weight": (("weights",), ["1.0"]),
    "bool weight": (("weights",), [True]),
    "weights not a list": (("weights",), {"0": 1.0}),
    "histogram wrong length": (("scores", "positives"), [0] * LOGIT_EDGES.size),
    "normal mean wrong length": (("normal", "mean"), [0.0] * (N_FEATURES - 1)),
    "normal comoment wrong length": (("normal", "comoment"), [0.0] * N_FEATURES),
    "normal comoment triangle short": (("normal", "comoment"), triangle([0.0] * N_FEATURES)),
    "normal comoment triangle NaN": (("normal", "comoment"), triangle([float("nan")] * TRIANGLE)),
    "normal comoment triangle huge": (("normal", "comoment"), triangle([1e300] * TRIANGLE)),
    "normal comoment not base64": (("normal", "comoment"), "!" * len(triangle([0.0] * TRIANGLE))),
    "normal comoment a number": (("normal", "comoment"), 4.0),
    "negative count in histogram": (("scores", "negatives"), [-1] + [0] * LOGIT_EDGES.size),
    "negative samples": (("samples_processed",), -5),
    "zero samples": (("samples_processed",), 0),
    "negative prequential": (("scores", "prequential", "tp"), -1),
    "float prequential": (("scores", "prequential", "tp"), 1.5),
    "prequential beyond a round": (("scores", "prequential", "tn"), 10**9 + 1),
    "prequential 2**62": (("scores", "prequential", "fp"), 2**62),
    "negative normal count": (("normal", "count"), -1.0),
    "version 2**40": (("model_version",), 2**40),
    "base version 2**40": (("base_global_version",), 2**40),
    "scored version 2**40": (("scores", "version"), 2**40),
    "negative base version": (("base_global_version",), -1),
    "round 0": (("model_version",), 0),
    "string version": (("model_version",), "3"),
    "unknown label source": (("label_source",), "oracle"),
    "missing device": (("device_id",), None),
    "control char device": (("device_id",), "dev\x00ice"),
    "long device": (("device_id",), "d" * 10_000),
    "bad timestamp": (("timestamp",), "yesterday"),
    "numeric timestamp": (("timestamp",), 1_762_473_601_592),
    "timestamp year 9999": (("timestamp",), "9999-01-01T00:00:00Z"),
    "scores not an object": (("scores",), [1, 2]),
    "normal not an object": (("normal",), None),
    "deep nesting in a field": (("weights",), json.loads(deep(500))),
}


@pytest.mark.parametrize("name", sorted(LOCAL_MUTATIONS))
def test_hostile_local_round_raises_invalid_message(name):
    path, value = LOCAL_MUTATIONS[name]
    payload = json.dumps(set_path(local_obj(), path, value))
    with pytest.raises(InvalidMessage):
        decode_local_round(payload)


GLOBAL_MUTATIONS = {
    "huge weight": (("weights",), [1e308] * Network(N_POOLED, 4).size),
    "wrong length": (("weights",), [0.0] * (Network(N_POOLED, 4).size - 1)),
    "length of another hidden size": (("hidden",), 5),
    "version 2**40": (("version",), 2**40),
    "version 0": (("version",), 0),
    "negative hidden": (("hidden",), -1),
    "huge hidden": (("hidden",), 10**6),
    "unknown detector": (("detector",), "auto"),
    "detector not a string": (("detector",), ["zscore"]),
    "threshold beyond limit": (("threshold",), 1e300),
    "threshold a string": (("threshold",), "0.5"),
    "negative normal count": (("normal", "count"), -3.0),
    "normal mean wrong length": (("normal", "mean"), [0.0]),
    "unknown label source": (("label_source",), None),
    "unknown discriminant labels": (("discriminant_labels",), "rule"),
    "discriminant labels not a string": (("discriminant_labels",), 1),
}


@pytest.mark.parametrize("name", sorted(GLOBAL_MUTATIONS))
def test_hostile_global_params_raise_invalid_message(name):
    path, value = GLOBAL_MUTATIONS[name]
    payload = json.dumps(set_path(global_obj(), path, value))
    with pytest.raises(InvalidMessage):
        decode_global_params(payload, KEY)


RAW_PAYLOADS = {
    "nested 10,000 deep": deep(10_000),
    "object nested 10,000 deep": '{"a":' * 10_000 + "1" + "}" * 10_000,
    "invalid utf-8": b'{"device_id": "\xff\xfe"}',
    "truncated": b'{"device_id": "a", "weights": [1.0',
    "not an object": b"[1, 2, 3]",
    "empty": b"",
    "null": b"null",
    "nan literal": b'{"weights": [NaN]}',
    "lone surrogate": b'{"device_id": "\\ud800"}',
    "duplicate garbage": b"\x00\x01\x02",
    "too large": b" " * (8 * 1024 * 1024 + 1),
}


@pytest.mark.parametrize("name", sorted(RAW_PAYLOADS))
@pytest.mark.parametrize("decode", [decode_local_round, decode_global, decode_anomaly])
def test_raw_hostile_payloads_raise_invalid_message(name, decode):
    with pytest.raises(InvalidMessage):
        decode(RAW_PAYLOADS[name])


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_anywhere_numeric_raise_invalid_message(token):
    for path in (("weights",), ("normal", "mean"), ("scores", "positives")):
        obj = local_obj()
        target = obj
        for key in path:
            target = target[key]
        target[0] = "__TOKEN__"
        payload = json.dumps(obj).replace('"__TOKEN__"', token)
        with pytest.raises(InvalidMessage):
            decode_local_round(payload)
    for name in ("loss", "accuracy"):
        payload = json.dumps(set_path(local_obj(), (name,), "__TOKEN__"))
        with pytest.raises(InvalidMessage):
            decode_local_round(payload.replace('"__TOKEN__"', token))
    for name in ("threshold", "normal_threshold"):
        payload = json.dumps(set_path(global_obj(), (name,), "__TOKEN__"))
        with pytest.raises(InvalidMessage):
            decode_global_params(payload.replace('"__TOKEN__"', token), KEY)


def test_non_bytes_payloads_raise_invalid_message():
    for payload in (None, 42, ["a"], {"version": 1}):
        for decode in (decode_local_round, decode_global, decode_anomaly):
            with pytest.raises(InvalidMessage):
                decode(payload)


# --------------------------------------------------------------------------------------------
# Property: nothing but InvalidMessage, whatever the JSON
# --------------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


def decoders_only_raise_invalid_message(payload) -> None:
    for decode in (decode_local_round, decode_global, decode_anomaly):
        with contextlib.suppress(InvalidMessage):
            decode(payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_json_only_raises_invalid_message(value):
    text = json.dumps(value)
    decoders_only_raise_invalid_message(text)
    decoders_only_raise_invalid_message(text.encode())


LOCAL_PATHS = [
    ("device_id",),
    ("model_version",),
    ("base_global_version",),
    ("weights",),
    ("samples_processed",),
    ("label_source",),
    ("loss",),
    ("accuracy",),
    ("normal",),
    ("normal", "count"),
    ("normal", "mean"),
    ("normal", "comoment"),
    ("scores",),
    ("scores", "version"),
    ("scores", "positives"),
    ("scores", "negatives"),
    ("scores", "normal"),
    ("scores", "prequential"),
    ("scores", "prequential", "fn"),
    ("timestamp",),
]
GLOBAL_PATHS = [
    ("version",),
    ("hidden",),
    ("weights",),
    ("threshold",),
    ("normal",),
    ("normal", "count"),
    ("normal", "comoment"),
    ("normal_threshold",),
    ("label_source",),
    ("detector",),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(LOCAL_PATHS),
    st.sampled_from(GLOBAL_PATHS),
    json_values,
    st.booleans(),
)
def test_valid_messages_with_one_random_field_only_raise_invalid_message(
    local_path, global_path, value, delete
):
    for obj, path, decode in (
        (local_obj(), local_path, decode_local_round),
        (global_obj(), global_path, decode_global),
    ):
        if delete:
            target = obj
            for key in path[:-1]:
                target = target[key]
            del target[path[-1]]
        else:
            set_path(obj, path, value)
        with contextlib.suppress(InvalidMessage):
            decode(json.dumps(obj))


# --------------------------------------------------------------------------------------------
# anomalies
# --------------------------------------------------------------------------------------------


def anomaly(**overrides) -> Anomaly:
    fields = {
        "device_id": "plc-7/line 2",
        "timestamp_ms": TS,
        "value": 71.5,
        "z_score": -3.25,
        "severity": "warning",
        "score": 4.125,
        "threshold": 2.5,
        "model_version": 17,
        "detector": "label_free",
        "channels": ("pressure", "temp"),
        "reason": "label_free model v17: score 4.12 >= 2.50; largest |z| 3.25 on pressure, temp",
    }
    fields.update(overrides)
    return Anomaly(**fields)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"detector": "zscore", "model_version": 0, "channels": ("value",), "severity": "critical"},
        {"detector": "supervised", "score": -0.5, "threshold": -1.0, "reason": ""},
        {"reason": "é ✓ \t tab and newline \n", "value": -1e15, "model_version": 2**31 - 1},
    ],
)
def test_anomaly_round_trip(overrides):
    original = anomaly(**overrides)
    payload = encode_anomaly(original)
    assert set(json.loads(payload)) == {
        "device_id",
        "timestamp",
        "value",
        "z_score",
        "severity",
        "score",
        "threshold",
        "model_version",
        "detector",
        "channels",
        "reason",
    }
    assert decode_anomaly(payload) == original


def anomaly_obj() -> dict:
    return json.loads(encode_anomaly(anomaly()))


ANOMALY_MUTATIONS = {
    "missing device": ("device_id", None),
    "control char device": ("device_id", "dev\x00ice"),
    "long device": ("device_id", "d" * 10_000),
    "bad timestamp": ("timestamp", "yesterday"),
    "timestamp year 9999": ("timestamp", "9999-01-01T00:00:00Z"),
    "value a string": ("value", "71.5"),
    "value beyond the limit": ("value", 1e300),
    "value a bool": ("value", True),
    "z missing": ("z_score", None),
    "score beyond the limit": ("score", -1e300),
    "threshold a list": ("threshold", [2.5]),
    "unknown severity": ("severity", "loud"),
    "unknown detector": ("detector", "auto"),
    "version negative": ("model_version", -1),
    "version 2**31": ("model_version", 2**31),
    "version a float": ("model_version", 3.0),
    "channels empty": ("channels", []),
    "channels a string": ("channels", "pressure"),
    "channel not a string": ("channels", ["pressure", 3]),
    "channel empty": ("channels", [""]),
    "channel repeated": ("channels", ["a", "a"]),
    "channel control char": ("channels", ["a\x07"]),
    "too many channels": ("channels", [f"c{i}" for i in range(257)]),
    "reason missing": ("reason", None),
    "reason too long": ("reason", "x" * 2001),
    "reason with NUL": ("reason", "a\x00b"),
    "reason a number": ("reason", 3),
}


@pytest.mark.parametrize("name", sorted(ANOMALY_MUTATIONS))
def test_hostile_anomaly_raises_invalid_message(name):
    field, value = ANOMALY_MUTATIONS[name]
    payload = json.dumps(set_path(anomaly_obj(), (field,), value))
    with pytest.raises(InvalidMessage):
        decode_anomaly(payload)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_anomaly_nan_and_infinity_raise_invalid_message(token):
    for name in ("value", "z_score", "score", "threshold"):
        payload = json.dumps(set_path(anomaly_obj(), (name,), "__TOKEN__"))
        with pytest.raises(InvalidMessage):
            decode_anomaly(payload.replace('"__TOKEN__"', token))


def test_anomaly_with_a_lone_surrogate_raises_invalid_message():
    for name in ("reason", "device_id"):
        payload = json.dumps(set_path(anomaly_obj(), (name,), "__X__")).replace("__X__", "\\ud800")
        with pytest.raises(InvalidMessage):
            decode_anomaly(payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(anomaly_obj())), json_values, st.booleans())
def test_anomaly_with_one_random_field_only_raises_invalid_message(field, value, delete):
    obj = anomaly_obj()
    if delete:
        del obj[field]
    else:
        obj[field] = value
    with contextlib.suppress(InvalidMessage):
        decode_anomaly(json.dumps(obj))


def test_a_comoment_travels_as_its_upper_triangle_and_an_older_full_list_still_reads():
    rng = np.random.default_rng(8)
    stats = NormalStats.of(rng.normal(size=(30, N_FEATURES)))
    update = local_round(normal=stats)
    obj = json.loads(encode_local_round(update))
    f = N_FEATURES
    rows, columns = np.triu_indices(f)
    expected = triangle(stats.comoment[rows, columns].tolist())
    assert obj["normal"]["comoment"] == expected
    np.testing.assert_array_equal(
        decode_local_round(json.dumps(obj)).normal.comoment, stats.comoment
    )
    # The form of an older learner: all F×F numbers as a list.
    obj["normal"]["comoment"] = stats.comoment.ravel().tolist()
    np.testing.assert_array_equal(
        decode_local_round(json.dumps(obj)).normal.comoment, stats.comoment
    )
