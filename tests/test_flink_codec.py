"""The Flink job's byte formats (streaming.flink_codec): readings packed across the key_by and
the keyed state as bytes give the learner exactly what the objects gave it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from streaming import learner
from streaming.flink_codec import decode_state, encode_state, pack, unpack, unpacked_readings
from streaming.messages import Reading, encode_anomaly, encode_local_round, single_reading
from streaming.model.detectors import LOGIT_EDGES, NORMAL_EDGES
from streaming.model.features import N_FEATURES, N_POOLED
from streaming.model.metrics import Confusion
from streaming.sources import synthetic_fleet


def test_pack_round_trips_single_and_multichannel_readings() -> None:
    single = [
        single_reading("a", 1_000, 1.5, 0),
        single_reading("a", 2_000, -2.25),
        single_reading("a", 3_000, 1e15, 1),
    ]
    multi = [
        Reading("pump", 5, (1.0, 2.0, -0.0), None, ("p", "q", "t")),
        Reading("pump", 6, (3.0, 4.0, 5e-300), 1, ("p", "q", "t")),
    ]
    assert unpacked_readings("a", pack(single)) == single
    assert unpacked_readings("pump", pack(multi)) == multi
    channels, values, labels, times = unpack(pack(multi))
    assert channels == ("p", "q", "t") and values.shape == (2, 3)
    assert labels.tolist() == [-1, 1] and times.tolist() == [5, 6]


def run(readings: list[Reading], through_bytes: bool, detector: learner.Detector):
    """Every output of the learner over ``readings`` in messages of up to 7 readings per device,
    the state kept as objects or, as the job keeps it, as bytes between messages."""
    config = detector.config
    states: dict[str, object] = {}
    out: list[bytes] = []
    held: dict[str, list[Reading]] = {}

    def message(device: str, batch: list[Reading]) -> None:
        stored = states.get(device)
        if through_bytes:
            state = decode_state(stored) if stored is not None else learner.DeviceState()
        else:
            state = stored if stored is not None else learner.DeviceState()
        channels, values, labels, times = unpack(pack(batch))
        found = learner.observe_arrays(
            state, device, channels, values, labels, times, detector, config, True
        )
        out.extend(encode_anomaly(a) for a in found)
        while learner.round_due(state, config):
            update = learner.train_round(state, device, detector.model, config, 7)
            out.append(encode_local_round(update))
        if len(out) % 3 == 0:  # a timer's round on a partial buffer, now and then
            update = learner.train_round(state, device, detector.model, config, 9)
            if update is not None:
                out.append(encode_local_round(update))
        if through_bytes:
            raw = encode_state(state)
            assert encode_state(decode_state(raw)) == raw
            states[device] = raw
        else:
            states[device] = state

    for reading in readings:
        batch = held.setdefault(reading.device_id, [])
        batch.append(reading)
        if len(batch) == 7:
            message(reading.device_id, held.pop(reading.device_id))
    for device, batch in held.items():
        message(device, batch)
    return out


def multichannel(devices: int = 3, n: int = 240) -> list[Reading]:
    rng = np.random.default_rng(5)
    out = []
    for k in range(n):
        for d in range(devices):
            v = rng.normal([20.0, 1e5, 0.5], [1.0, 50.0, 0.01])
            if rng.random() < 0.03:
                v = v * 1.5
            out.append(
                Reading(
                    f"plc_{d}",
                    1_000 * k + d,
                    tuple(v.tolist()),
                    int(k % 17 == 0),
                    ("humidity", "pressure", "vibration"),
                )
            )
    return out


@pytest.mark.parametrize("kind", ["zscore", "model"])
def test_the_learner_gives_the_same_outputs_with_its_state_in_bytes(kind: str) -> None:
    config = dataclasses.replace(learner.LearnerConfig(), train_every=20, positive_memory=4)
    readings = list(synthetic_fleet(num_devices=6, readings_per_device=150, seed=9))
    readings += multichannel()
    model = None
    if kind == "model":  # a version with both detectors ready, so every counter moves
        from streaming.model.detectors import NormalStats

        rng = np.random.default_rng(1)
        network = config.network
        rows = rng.normal(size=(200, N_FEATURES))  # the normal model: every feature
        model = learner.GlobalParams(
            version=3,
            hidden=config.hidden,
            params=network.initial(),
            threshold=0.0,
            normal=NormalStats.of(rows),
            normal_threshold=3.0,
            label_source="ground_truth",
            detector="supervised",
            discriminant=rng.normal(size=N_FEATURES + 1),
            discriminant_threshold=0.5,
        )
    detector = learner.Detector(model, config)
    objects = run(readings, False, detector)
    assert len(objects) > 50
    assert run(readings, True, detector) == objects


def test_keyed_state_of_the_format_before_the_discriminant_still_reads() -> None:
    # Format 1 had no discriminant histograms: with no buffered row (whose width changed in
    # format 3) and no feature state (no z window), its bytes are format 3's without those two
    # arrays.
    state = learner.DeviceState()
    state.hist_pos[3], state.hist_normal_neg[5], state.hist_disc_pos[7] = 2, 4, 9
    payload = encode_state(state)
    header = np.frombuffer(payload, np.int64, 22).copy()
    bins = state.hist_pos.size
    start = 8 * (22 + 2 * bins + 3 * state.hist_normal.size)  # no buffered rows: no labels
    assert header[0] == 4 and header[17] == 0  # no z window (formats 1-2: no candidate counts)
    header[0] = 1
    old = header.tobytes() + payload[8 * 22 : start] + payload[start + 8 * 2 * bins :]
    decoded = decode_state(old)
    assert decoded.hist_pos[3] == 2 and decoded.hist_normal_neg[5] == 4
    assert decoded.hist_disc_pos.sum() == decoded.hist_disc_neg.sum() == 0
    again = decode_state(payload)
    assert again.hist_disc_pos[7] == 9


def personal_model(rng: np.random.Generator, ready: bool) -> learner.PersonalModel:
    from streaming.model.detectors import NormalStats

    personal = learner.PersonalModel.empty()
    personal.learn(
        NormalStats.of(rng.normal(size=(30, N_FEATURES))),
        NormalStats.of(rng.normal(size=(3 if ready else 0, N_FEATURES))),
    )
    personal.hist_pos = rng.uniform(0, 5, LOGIT_EDGES.size + 1)
    personal.hist_neg = rng.uniform(0, 5, LOGIT_EDGES.size + 1)
    personal.wins, personal.losses = 6.5, 1.25
    if ready:
        personal.threshold = 0.75
    return personal


@pytest.mark.parametrize("ready", [True, False])
def test_the_personal_model_travels_in_the_state_exactly(ready: bool) -> None:
    state = learner.DeviceState(personal=personal_model(np.random.default_rng(3), ready))
    back = decode_state(encode_state(state)).personal
    sent = state.personal
    for name in ("counts", "means", "within", "hist_pos", "hist_neg"):
        assert np.array_equal(getattr(back, name), getattr(sent, name)), name
    assert (back.wins, back.losses, back.threshold) == (6.5, 1.25, 0.75 if ready else None)
    assert (back.params is None) == (not ready)
    if ready:
        assert np.array_equal(back.params, sent.params)


def test_keyed_state_of_format_3_reads_without_a_personal_model() -> None:
    # Format 3 ended at the channel names; format 4 appends the personal model after them.
    state = learner.DeviceState(personal=personal_model(np.random.default_rng(8), True))
    state.hist_neg[2] = 5
    without = encode_state(learner.DeviceState(hist_neg=state.hist_neg.copy()))
    payload = encode_state(state)
    # Counts 2, means 2·F, the co-moment's upper triangle, two histograms, wins, losses,
    # threshold, F + 1 parameters: float64 each.
    f, bins = N_FEATURES, LOGIT_EDGES.size + 1
    personal_bytes = 8 * (2 + 2 * f + f * (f + 1) // 2 + 2 * bins + 3 + f + 1)
    assert payload == without + payload[len(without) :]
    assert len(payload) - len(without) == personal_bytes
    old = np.int64(3).tobytes() + without[8:]
    decoded = decode_state(old)
    assert decoded.personal is None and decoded.hist_neg[2] == 5
    assert decode_state(without).personal is None


def test_keyed_state_of_format_2_reads_with_its_rows_widened_by_zeros() -> None:
    # Format 2, written here by hand: the 22-field header, the int64 arrays (labels, the seven
    # histograms, the per-detector counts), the float64 arrays (feature state, rows and
    # remembered anomalies of 18 features, local parameters, last |z|), pseudo flags, names.
    rng = np.random.default_rng(4)
    c, window, n_rows, n_pos = 2, 5, 3, 2
    logit_bins, normal_bins = LOGIT_EDGES.size + 1, NORMAL_EDGES.size + 1
    channels, kinds = ("humidity", "temperature"), ("zscore", "supervised")
    names = "\x00".join(channels + kinds).encode()
    params = rng.normal(size=N_POOLED + 1)  # the network of 18 inputs, hidden 0
    header = [2, c, 40, 35, 32, 1, window, n_rows, n_rows, n_pos, 6, params.size, 4]
    header += [3, 1, 40, 2, len(kinds), len(names), logit_bins, normal_bins, 1_700_000_000_000]
    labels = np.array([0, 1, 0])
    hists = [rng.integers(0, 9, n) for n in (logit_bins, logit_bins) + (normal_bins,) * 3]
    hists += [rng.integers(0, 9, logit_bins) for _ in range(2)]
    candidate_counts = np.array([2, 5, 36, 3, 3, 1, 40, 2])
    mean, m2 = rng.normal(size=c), rng.uniform(1, 2, c)
    comoment, precision = rng.normal(size=(c, c)), rng.normal(size=(c, c))
    window_values = rng.normal(size=(window, c))
    rows, kept = rng.uniform(0, 5, (n_rows, 18)), rng.uniform(0, 5, (n_pos, 18))
    last_abs_z = rng.uniform(0, 3, c)
    pseudo = np.array([False, True, False])
    ints = [header, labels, *hists, candidate_counts]
    floats = [mean, m2, comoment, precision, window_values, rows, kept, params, last_abs_z]
    old = b"".join(
        [
            *(np.asarray(a, "<i8").tobytes() for a in ints),
            *(np.asarray(a, "<f8").tobytes() for a in floats),
            pseudo.astype("?").tobytes(),
            names,
        ]
    )

    state = decode_state(old)
    f = state.features
    assert f.channels == channels
    assert (f.seen, f.count, f.refreshed_at, f.gated) == (40, 35, 32, 1)
    for got, want in ((f.mean, mean), (f.m2, m2), (f.comoment, comoment)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(f.precision, precision)
    np.testing.assert_array_equal(f.window, window_values)
    np.testing.assert_array_equal(f.last_abs_z, last_abs_z)
    # The rows: their 18 pooled features, then zeros in every channel slot.
    assert N_FEATURES > 18
    (got_rows,) = state.rows
    assert got_rows.shape == (n_rows, N_FEATURES) and state.positives.shape == (n_pos, N_FEATURES)
    np.testing.assert_array_equal(got_rows[:, :18], rows)
    np.testing.assert_array_equal(state.positives[:, :18], kept)
    assert not got_rows[:, 18:].any() and not state.positives[:, 18:].any()
    np.testing.assert_array_equal(state.labels[0], labels)
    np.testing.assert_array_equal(state.pseudo[0], pseudo)
    assert (state.buffered, state.rounds, state.scored_version) == (n_rows, 6, 4)
    assert state.since_ms == 1_700_000_000_000
    assert state.prequential == Confusion(3, 1, 40, 2)
    np.testing.assert_array_equal(state.local_params, params)
    decoded = (
        state.hist_pos,
        state.hist_neg,
        state.hist_normal,
        state.hist_normal_pos,
        state.hist_normal_neg,
        state.hist_disc_pos,
        state.hist_disc_neg,
    )
    for got, want in zip(decoded, hists, strict=True):
        np.testing.assert_array_equal(got, want)
    # Written again, it is format 3 and reads back the same.
    again = encode_state(state)
    assert np.frombuffer(again, np.int64, 1)[0] == 4
    assert encode_state(decode_state(again)) == again
    np.testing.assert_array_equal(decode_state(again).rows[0], got_rows)
    # The widened rows train: a round of the restored state has every feature's statistics.
    config = dataclasses.replace(learner.LearnerConfig(), hidden=0, min_round_samples=1)
    update = learner.train_round(state, "plc", None, config, 0)
    assert update.samples == n_rows and update.params.size == params.size
    assert update.normal.mean.shape == (N_FEATURES,)
    np.testing.assert_array_equal(update.normal.mean[:18], rows[labels == 0].mean(0))
