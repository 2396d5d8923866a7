"""The FedAvg service: local rounds in, versioned global models out.

A thin Kafka + PostgreSQL shell around :class:`streaming.federation.Federation` (the round,
its aggregation rule, calibration and detector choice live there, transport-free). It consumes
``local-model-updates`` in a consumer group (manual commits, ``read_committed``), adds each
decoded round to the federation, and closes a version when :meth:`Federation.due` says so —
checked after every message and after every poll, with wall-clock time, so that the round's
time window closes it on a quiet fleet too. Closing a version does, in this order:

1. one transaction: the ``federated_models`` row (parameters, calibrated thresholds, chosen
   detector and ``server_state``, everything the server carries to the next version), one
   ``local_models`` row per *message* that went into it (a device's two rounds merged into one
   update are stored as their two original rounds, the merged weight split by samples), and the
   prequential counts devices reported, added per version into ``prequential_evaluations``;
2. the version on ``global-model-updates`` (key: the version);
3. the consumer offsets of exactly the messages that went into it.

Every message is handled on its own: one that cannot be used (undecodable, wrong size, a base
version from the future, or a row PostgreSQL would refuse, tried in a transaction that is rolled
back) goes to the dead-letter topic with the reason and is counted, and the service goes on. Its
offset is committed only once its dead letter is acknowledged by Kafka and every earlier message of
its partition is (a buffered round is "earlier" until its version is stored). Failures of the
infrastructure itself (PostgreSQL or Kafka unreachable) are not the message's fault: they stop the
service, which resumes from the committed offsets. A round already in ``local_models`` (read again
after a crash between steps 1 and 3) is skipped. On start the service rebuilds the federation's
state from the newest stored version and publishes that version again (devices ignore versions they
already have). Every published version is signed (HMAC-SHA256 with the deployment's
``model_signing_key``, see :mod:`flead.secrets`): devices adopt nothing else. A crash anywhere
therefore leaves versions 1..n without gap or duplicate, and every round in exactly one version.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from psycopg.types.json import Jsonb

from flead.config import Settings, load_settings
from flead.faults import FEDAVG_AFTER_DB_COMMIT, crash_point
from flead.kafka import DeadLetters, client_config, producer_config
from flead.secrets import secret
from streaming.federation import (
    Federation,
    FederationConfig,
    ServerState,
    Version,
    discriminant_json,
    label_free_statistics,
    saved_discriminant,
)
from streaming.learner import GlobalParams, LocalRound, as_sent
from streaming.messages import decode_local_round, encode_global_params
from streaming.model.detectors import NormalStats
from streaming.model.features import N_FEATURES

log = logging.getLogger("flead.fedavg")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the server's state as JSON (federated_models.server_state) ------------------------------

STATE_FORMAT = 1


def state_to_json(federation: Federation) -> dict[str, Any]:
    """Everything beyond the version's own columns that the next version depends on."""
    s = federation.state
    newest = max(federation.last_seen.values(), default=0)
    horizon = newest - federation.config.active_window_ms
    return {
        "format": STATE_FORMAT,
        "normal": _stats_json(s.normal),
        "hist_pos": s.hist_pos.tolist(),
        "hist_neg": s.hist_neg.tolist(),
        "hist_normal": s.hist_normal.tolist(),
        "hist_normal_pos": s.hist_normal_pos.tolist(),
        "hist_normal_neg": s.hist_normal_neg.tolist(),
        "anomalous": _stats_json(s.anomalous),
        "pseudo_normal": _stats_json(s.pseudo_normal),
        "pseudo_anomalous": _stats_json(s.pseudo_anomalous),
        "discriminant_since": s.discriminant_since,
        "hist_disc_pos": s.hist_disc_pos.tolist(),
        "hist_disc_neg": s.hist_disc_neg.tolist(),
        # The version's discriminant rides here rather than in columns of its own: only the
        # service (restarting) and the evaluations read it, and both read this state.
        "discriminant": discriminant_json(s.current),
        "velocity": None if s.velocity is None else s.velocity.tolist(),
        # When each device was last heard of (its own clock), for "devices active recently";
        # devices silent for longer than the active window no longer count and are dropped.
        "last_seen": {d: t for d, t in sorted(federation.last_seen.items()) if t >= horizon},
    }


def _stats_json(stats: NormalStats) -> dict[str, Any]:
    return {
        "count": float(stats.count),
        "mean": stats.mean.tolist(),
        "comoment": stats.comoment.tolist(),
    }


def _stats_from(saved: dict[str, Any], name: str) -> NormalStats:
    """A saved statistics block; absent (a service before it existed): no rows."""
    found = saved.get(name)
    if found is None:
        return NormalStats.empty()
    return NormalStats(float(found["count"]), _array(found["mean"]), _array(found["comoment"]))


def _array(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def state_from_row(row: tuple) -> tuple[ServerState, dict[str, int]]:
    """``ServerState`` and the devices' last-seen times from the newest ``federated_models`` row
    (global_version, hidden, weights, threshold, normal_threshold, label_source, detector,
    server_state)."""
    version, hidden, weights, threshold, normal_threshold, label_source, detector, saved = row
    if saved is None or hidden is None:
        raise RuntimeError(
            f"global version {version} has no server_state: it was made by the first model's "
            "service; the detection learner cannot continue from it (start on a new database)"
        )
    normal = _stats_from(saved, "normal")
    anomalous = _stats_from(saved, "anomalous")
    pseudo_normal = _stats_from(saved, "pseudo_normal")
    pseudo_anomalous = _stats_from(saved, "pseudo_anomalous")
    discriminant, discriminant_threshold, discriminant_labels = saved_discriminant(saved)
    no_hist = np.zeros_like(saved["hist_pos"])
    if normal.mean.size != N_FEATURES:
        # Statistics of another feature layout (a service before the channel slots) cannot be
        # carried over: the statistical models start again; the network (pooled features) goes on.
        log.warning(
            "version %s holds statistics of %d features, this learner has %d: the "
            "discriminant and label-free model start again from the next rounds",
            version,
            normal.mean.size,
            N_FEATURES,
        )
        normal = anomalous = pseudo_normal = pseudo_anomalous = NormalStats.empty()
        discriminant = discriminant_threshold = normal_threshold = None
        no_normal_hist = np.zeros_like(saved["hist_normal"])
        saved = {
            **saved,
            "hist_normal": no_normal_hist,
            "hist_normal_pos": no_normal_hist,
            "hist_normal_neg": no_normal_hist,
            "hist_disc_pos": no_hist,
            "hist_disc_neg": no_hist,
        }
    current = GlobalParams(
        version=version,
        hidden=hidden,
        params=_array(weights),
        threshold=threshold,
        normal=label_free_statistics(normal, pseudo_normal),
        normal_threshold=normal_threshold,
        label_source=label_source,
        detector=detector,
        discriminant=discriminant,
        discriminant_threshold=discriminant_threshold,
        discriminant_labels=discriminant_labels,
    )
    state = ServerState(
        current=current,
        velocity=None if saved["velocity"] is None else _array(saved["velocity"]),
        hist_pos=_array(saved["hist_pos"]),
        hist_neg=_array(saved["hist_neg"]),
        hist_normal=_array(saved["hist_normal"]),
        # Absent from the state of a service before labelled label-free calibration.
        hist_normal_pos=_array(saved.get("hist_normal_pos", np.zeros_like(saved["hist_normal"]))),
        hist_normal_neg=_array(saved.get("hist_normal_neg", np.zeros_like(saved["hist_normal"]))),
        normal=normal,
        anomalous=anomalous,
        pseudo_normal=pseudo_normal,
        pseudo_anomalous=pseudo_anomalous,
        discriminant_since=int(saved.get("discriminant_since", 0)),
        hist_disc_pos=_array(saved.get("hist_disc_pos", no_hist)),
        hist_disc_neg=_array(saved.get("hist_disc_neg", no_hist)),
    )
    return state, {d: int(t) for d, t in saved.get("last_seen", {}).items()}


# --- storage ---------------------------------------------------------------------------------

_LATEST = (
    "SELECT global_version, hidden, weights, threshold, normal_threshold, label_source,"
    " detector, server_state, num_devices, strategy, accuracy"
    " FROM federated_models ORDER BY global_version DESC LIMIT 1"
)


def restore(conn: psycopg.Connection, config: FederationConfig) -> tuple[Federation, tuple | None]:
    """A federation continuing after the newest stored version (and that row), or a new one."""
    row = conn.execute(_LATEST).fetchone()
    if row is None:
        return Federation(config), None
    state, last_seen = state_from_row(row[:8])
    if state.current.hidden != config.hidden:
        raise RuntimeError(
            f"global version {state.current.version} has {state.current.hidden} hidden units, "
            f"FLEAD_HIDDEN_UNITS is {config.hidden}: the devices' rounds would not fit it"
        )
    federation = Federation(config, state)
    federation.last_seen = last_seen
    return federation, row


RoundKey = tuple[str, int, int]
"""A local round's identity: device, the event time its device state began, round."""


def round_key(update: LocalRound) -> RoundKey:
    return update.device_id, update.since_ms, update.round


def stored_keys(conn: psycopg.Connection, keys: list[RoundKey]) -> set[RoundKey]:
    """Which of ``keys`` are already in ``local_models``."""
    if not keys:
        return set()
    rows = conn.execute(
        "SELECT device_id, state_since_ms, model_version FROM local_models"
        " WHERE (device_id, state_since_ms, model_version)"
        " IN (SELECT * FROM unnest(%s::text[], %s::bigint[], %s::int[]))",
        ([d for d, _, _ in keys], [s for _, s, _ in keys], [v for _, _, v in keys]),
    ).fetchall()
    return {(device, since, version) for device, since, version in rows}


_INSERT_LOCAL = (
    "INSERT INTO local_models (device_id, model_version, global_version, accuracy,"
    " loss, samples_processed, weights, bias, aggregated_into, aggregation_weight,"
    " label_source, created_at, state_since_ms)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, 0, %s, %s, %s, %s, %s)"
)


def _row(r: LocalRound, version: int, weight: float) -> tuple:
    return (
        r.device_id,
        r.round,
        r.base_version,
        r.accuracy,
        r.loss,
        r.samples,
        r.params.tolist(),
        version,
        weight,
        r.label_source,
        datetime.fromtimestamp(r.timestamp_ms / 1000, UTC),
        r.since_ms,
    )


#: Errors that say PostgreSQL (or the way there) failed, not that a row is bad: a message is
#: never dead-lettered for them.
INFRASTRUCTURE_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


def unstorable(conn: psycopg.Connection, updates: list[LocalRound]) -> dict[int, str]:
    """Index → reason for each round whose ``local_models`` row PostgreSQL would refuse (a type,
    range or text the decoder let through). The rows are inserted in a transaction that is
    always rolled back: all at once, and one by one only when that fails. A round already stored
    is not refused here (``ON CONFLICT DO NOTHING``): it is a replay, skipped by the caller."""
    if not updates:
        return {}
    probe = _INSERT_LOCAL + " ON CONFLICT DO NOTHING"
    try:
        with conn.transaction(force_rollback=True), conn.cursor() as cursor:
            cursor.executemany(probe, [_row(u, 0, 0.0) for u in updates])
        return {}
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception:  # one of them is bad: find which
        pass
    refused = {}
    for i, update in enumerate(updates):
        try:
            with conn.transaction(force_rollback=True), conn.cursor() as cursor:
                cursor.execute(probe, _row(update, 0, 0.0))
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            refused[i] = f"PostgreSQL would refuse this round: {type(exc).__name__}: {exc}"[:500]
    return refused


def local_rows(version: Version, rounds: dict[str, list[LocalRound]]) -> list[tuple]:
    """One ``local_models`` row per original round: a device's merged update is stored as the
    rounds it was made of, its aggregation weight split in proportion to their samples (so
    ``Σ weight·(params − reference)`` over the rows is still the version's sum)."""
    rows = []
    for update, weight in zip(version.updates, version.weights, strict=True):
        originals = rounds.get(update.device_id) or [update]
        total = sum(r.samples for r in originals)
        for r in originals:
            rows.append(_row(r, version.model.version, weight * r.samples / total))
    return rows


def store_version(
    conn: psycopg.Connection,
    version: Version,
    rounds: dict[str, list[LocalRound]],
    server_state: dict[str, Any],
    strategy: str,
    now_ms: int,
) -> None:
    """The version, the rounds it was made of and its prequential counts, in one transaction.
    ``rounds``: device → its original rounds (``Federation.merged`` before the close)."""
    model = version.model
    with conn.transaction(), conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO federated_models (global_version, aggregation_round, num_devices,"
            " accuracy, weights, bias, strategy, created_at, hidden, threshold,"
            " normal_threshold, label_source, detector, server_state)"
            " VALUES (%s, %s, %s, %s, %s, 0, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                model.version,
                model.version,
                version.num_devices,
                version.accuracy,
                model.params.tolist(),
                strategy,
                datetime.fromtimestamp(now_ms / 1000, UTC),
                model.hidden,
                model.threshold,
                model.normal_threshold,
                model.label_source,
                model.detector,
                Jsonb(server_state),
            ),
        )
        cursor.executemany(_INSERT_LOCAL, local_rows(version, rounds))
        cursor.executemany(
            "INSERT INTO prequential_evaluations AS p (model_version, tp, fp, tn, fn)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (model_version) DO UPDATE SET"
            " tp = p.tp + EXCLUDED.tp, fp = p.fp + EXCLUDED.fp, tn = p.tn + EXCLUDED.tn,"
            " fn = p.fn + EXCLUDED.fn, updated_at = now()",
            [(v, c.tp, c.fp, c.tn, c.fn) for v, c in sorted(version.prequential.items())],
        )


# --- offsets -----------------------------------------------------------------------------


@dataclass
class _Pending:
    offset: int
    done: bool = False  # in a stored version, dead-lettered or skipped


class Offsets:
    """Consumed messages per partition, in order, until they are committable: a partition's
    commit position is the first message not yet in a stored version (or refused)."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, int], deque[_Pending]] = {}
        self.committed: dict[tuple[str, int], int] = {}

    def consumed(self, message: Message, done: bool = False) -> _Pending:
        entry = _Pending(message.offset(), done)
        self.pending.setdefault((message.topic(), message.partition()), deque()).append(entry)
        return entry

    def committable(self) -> list[TopicPartition]:
        """Partitions whose commit position moved, with it (and it is taken as committed)."""
        out = []
        for (topic, partition), queue in self.pending.items():
            position = None
            while queue and queue[0].done:
                position = queue.popleft().offset + 1
            if position is not None:
                self.committed[(topic, partition)] = position
                out.append(TopicPartition(topic, partition, position))
        return out


# --- the service ---------------------------------------------------------------------------


class FedAvgService:
    def __init__(
        self,
        settings: Settings,
        config: FederationConfig | None = None,
        clock=wall_clock_ms,
    ) -> None:
        self.settings = settings
        self.config = config or FederationConfig.from_settings(settings)
        self.topics = settings.topics
        self.clock = clock
        self.conn = psycopg.connect(settings.database_url, autocommit=True)
        self.federation, self.latest = restore(self.conn, self.config)
        self.consumer = Consumer(
            client_config(
                settings,
                "fedavg",
                **{
                    "group.id": settings.consumer_group("fedavg"),
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "isolation.level": "read_committed",
                    # A restarted service gets its partitions back after this, not Kafka's 45 s.
                    "session.timeout.ms": 10_000,
                },
            )
        )
        self.producer = Producer(producer_config(settings, "fedavg", **{"linger.ms": 5}))
        self.refused = DeadLetters(self.producer, settings.topics.dead_letter)
        # Taken once: the same state folder (or FLEAD_MODEL_SIGNING_KEY) gives the Flink job
        # the same key to verify with.
        self.signing_key = secret(settings.state_dir, "model_signing_key")
        self.offsets = Offsets()
        self.buffered: list[_Pending] = []  # the offsets of the rounds in the open round
        self.keys: set[RoundKey] = set()  # the rounds in the open round
        self.skipped = 0
        self.versions = 0
        self.running = True

    def run(self, max_versions: int | None = None) -> None:
        self.consumer.subscribe([self.topics.local_updates])
        try:
            if self.latest is not None:
                version, num_devices, strategy, accuracy = (
                    self.latest[0],
                    self.latest[8],
                    self.latest[9],
                    self.latest[10],
                )
                log.info("resuming after global version %d", version)
                self._publish(self.federation.state.current, num_devices, strategy, accuracy)
            while self.running and (max_versions is None or self.versions < max_versions):
                messages = self.consumer.consume(1000, timeout=0.5)
                self.handle(messages, max_versions)
        finally:
            self.close()

    def handle(self, messages: list[Message], max_versions: int | None = None) -> None:
        """One poll's messages, in order; then a version if one is due by the clock."""
        decoded: list[tuple[Message, LocalRound | None, str | None]] = []
        for message in messages:
            if message.error() is not None:
                if message.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", message.error())
                continue
            try:
                decoded.append((message, decode_local_round(message.value()), None))
            except Exception as exc:  # whatever the bytes, the service goes on
                decoded.append((message, None, str(exc) or type(exc).__name__))
        # What the decoder let through but PostgreSQL would refuse is refused here, one round
        # at a time, rather than failing the whole version's transaction later (and with it
        # the service, again after every restart).
        positions = [i for i, (_, u, _) in enumerate(decoded) if u is not None]
        refused = unstorable(self.conn, [decoded[i][1] for i in positions])
        for j, reason in refused.items():
            message = decoded[positions[j]][0]
            decoded[positions[j]] = (message, None, reason)
        stored = stored_keys(self.conn, [round_key(u) for _, u, _ in decoded if u is not None])
        for message, update, problem in decoded:
            if max_versions is not None and self.versions >= max_versions:
                break  # the rest stays uncommitted: read again by the next run
            if update is not None:
                key = round_key(update)
                if key in stored or key in self.keys:
                    self.skipped += 1
                    log.info("skipping %s (state since %d) round %d: already received", *key)
                    self.offsets.consumed(message, done=True)
                    continue
                try:
                    self.federation.add(update)
                except Exception as exc:  # a bad round never stops the service
                    problem = str(exc) or type(exc).__name__
                else:
                    self.keys.add(key)
                    self.buffered.append(self.offsets.consumed(message))
                    self._close_if_due(stored)
                    continue
            self._refuse(message, problem)
        self._close_if_due(stored)
        self._commit()

    def _refuse(self, message: Message, reason: str) -> None:
        self.refused.send(message, reason)
        self.offsets.consumed(message, done=True)

    def _close_if_due(self, stored: set[RoundKey]) -> None:
        now = self.clock()
        if not self.federation.due(now):
            return
        rounds = {d: list(rs) for d, rs in self.federation.merged.items()}
        version = self.federation.close(now)
        model = version.model
        store_version(
            self.conn,
            version,
            rounds,
            state_to_json(self.federation),
            self.config.rule,
            now,
        )
        # The version's rows are committed, its rounds' offsets not yet: a crash here must
        # neither lose nor double a round (the restarted service skips what is stored).
        crash_point(self.settings, FEDAVG_AFTER_DB_COMMIT)
        stored |= self.keys  # a copy of a stored round later in this poll is skipped too
        self._publish(model, version.num_devices, self.config.rule, version.accuracy, now)
        for entry in self.buffered:
            entry.done = True
        self.buffered, self.keys = [], set()
        self._commit()
        self.versions += 1
        log.info(
            "global version %d from %d rounds of %d devices (%s, detector %s)",
            model.version,
            sum(len(rs) for rs in rounds.values()),
            version.num_devices,
            self.config.rule,
            model.detector,
        )

    def _commit(self) -> None:
        offsets = self.offsets.committable()
        if not offsets:
            return
        # The dead letters of refused messages first: a refused message's offset is committed
        # only once its dead letter is in Kafka (flush() also counts failed deliveries as
        # gone, hence the delivery reports).
        self.refused.confirm()
        self.consumer.commit(offsets=offsets, asynchronous=False)

    def _publish(
        self,
        model: GlobalParams,
        num_devices: int,
        strategy: str,
        accuracy: float | None,
        now_ms: int | None = None,
    ) -> None:
        payload = encode_global_params(
            as_sent(model, self.settings.detector),
            self.clock() if now_ms is None else now_ms,
            key=self.signing_key,
            num_devices=num_devices,
            strategy=strategy,
            accuracy=accuracy,
        )
        self.producer.produce(self.topics.global_updates, payload, key=str(model.version).encode())
        if self.producer.flush(30):
            raise RuntimeError(f"global version {model.version} was not acknowledged by Kafka")

    @property
    def dead_letters(self) -> int:
        return self.refused.count

    def stop(self, *_: object) -> None:
        self.running = False

    def close(self) -> None:
        self.producer.flush(30)
        self.consumer.close()
        self.conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FLEAD's federated averaging service")
    parser.add_argument("--max-versions", type=int, help="exit after creating this many versions")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    service = FedAvgService(load_settings())
    signal.signal(signal.SIGTERM, service.stop)
    signal.signal(signal.SIGINT, service.stop)
    service.run(args.max_versions)


if __name__ == "__main__":
    main()
