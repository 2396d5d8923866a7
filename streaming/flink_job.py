"""The edge tier as a PyFlink job: every key is one device's on-device learner
(:mod:`streaming.learner`: multichannel features, the newest global version's detector, local
rounds of the supervised network plus the statistics the server calibrates with).

    edge-iiot-stream ──parse──► key_by(device) ──┐
                        │                        ├─► EdgeLearner ──route──┬─► anomalies
    global-model-updates ──parse──► broadcast ───┘                        ├─► local-model-updates
                        │                                                  └─► (channel changes)
                        └──── invalid input ──────────────────────────────────► dead-letter topic

Between the operators travel declared Flink types, not pickled objects: the parse step emits
``(device_id, packed columns)`` per device of a message and the keyed state is compact bytes
(:mod:`streaming.flink_codec`; why: README "Measured", the job's profile).

Run it with ``python -m streaming.flink_job`` (a local mini-cluster) or submit the same file to a
Flink cluster with ``flink run -py streaming/flink_job.py``. Settings come from
:mod:`flead.config` (``FLEAD_*`` variables). With checkpointing on and retained checkpoints,
``--resume`` (the default of ``flead``'s launcher) restarts from the newest one.

Hardening (what any producer may send never stops the job):

- Both sources hand the raw bytes to Python (``ByteArraySchema``): UTF-8 is checked by the
  decoders, so invalid bytes are dead-lettered as they are (a string deserializer would turn them
  into U+FFFD and accept them, and it fails on a null value; the byte deserializer skips a null
  value, a Kafka tombstone, which carries nothing to score).
- Every record is handled in its own ``try``: whatever fails to decode, validate or process goes
  to the dead-letter topic with the reason, and the job goes on.
- Global versions are adopted only with a valid HMAC signature of the FedAvg service (the
  ``model_signing_key`` of :mod:`flead.secrets`, read when each task opens, never shipped in the
  job graph) and only when newer than the version a device holds.
- Restarts are bounded (``flink_restart_*`` settings: Flink's failure-rate strategy), so a fault
  that survives restarts fails the job instead of looping.
- Keyed state of a device silent for ``device_state_ttl_s`` (processing time) expires.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pyflink.common import Configuration, Types, WatermarkStrategy
from pyflink.common.serialization import ByteArraySchema, SimpleStringSchema
from pyflink.common.time import Time
from pyflink.datastream import (
    CheckpointingMode,
    ExternalizedCheckpointRetention,
    OutputTag,
    StreamExecutionEnvironment,
)
from pyflink.datastream.connectors.base import DeliveryGuarantee
from pyflink.datastream.connectors.kafka import (
    KafkaOffsetResetStrategy,
    KafkaOffsetsInitializer,
    KafkaRecordSerializationSchema,
    KafkaSink,
    KafkaSource,
)
from pyflink.datastream.functions import KeyedBroadcastProcessFunction, ProcessFunction
from pyflink.datastream.state import MapStateDescriptor, StateTtlConfig, ValueStateDescriptor

from flead import services
from flead.config import Settings, load_settings
from flead.kafka import FLINK_SHADED_PREFIX, java_client_properties
from flead.secrets import secret
from streaming import learner
from streaming.flink_codec import decode_state, encode_state, pack, unpack, unpacked_readings
from streaming.learner import ChannelMismatch, Detector, DeviceState, GlobalParams, LearnerConfig
from streaming.messages import (
    Reading,
    dead_letter,
    decode_global_params,
    decode_readings,
    decode_stored_global_params,
    encode_anomaly,
    encode_local_round,
    encode_reading,
    encode_reading_batch,
)

DEAD_LETTERS = OutputTag("dead-letters", Types.STRING())
LOCAL_UPDATES = OutputTag("local-updates", Types.STRING())
ANOMALY, LOCAL_UPDATE, DEAD_LETTER = "anomaly", "local-update", "dead-letter"
LEARNER_OUTPUT = Types.TUPLE([Types.STRING(), Types.STRING()])  # (kind, JSON)
# The newest global version: its number and its JSON (as published), so a restore needs no
# Python class to read it back.
GLOBAL_MODEL = MapStateDescriptor("global-model", Types.STRING(), Types.STRING())
VERSION, MODEL = "version", "model"
RAW = Types.PRIMITIVE_ARRAY(Types.BYTE())  # what the sources emit: a message's bytes
# What the parse step hands to the keyed learner: (device_id, packed columns), declared types,
# so Flink moves two byte strings instead of pickling a list of Reading objects (see pack).
DEVICE_READINGS = Types.TUPLE([Types.STRING(), RAW])
SIGNING_KEY = "model_signing_key"


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class ParseReadings(ProcessFunction):
    """JSON → ``(device_id, packed readings)`` per device of the message; anything invalid →
    the dead-letter side output. Readings of one or several named channels are both valid:
    the learner checks that a device keeps its channels."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def process_element(self, value: bytes, ctx: ProcessFunction.Context):
        try:
            readings = decode_readings(value)
        except Exception as exc:  # InvalidMessage, or anything else: never the job's failure
            yield DEAD_LETTERS, dead_letter(self.topic, value, _reason(exc)).decode()
            return
        first = readings[0].device_id
        if all(r.device_id == first for r in readings):  # the usual form: one device
            by_device = {first: readings}
        else:
            by_device = {}
            for reading in readings:
                by_device.setdefault(reading.device_id, []).append(reading)
        for device_id, own in by_device.items():
            channels = own[0].channels
            if any(r.channels != channels for r in own):
                # What the learner says of such readings (streaming.learner.observe).
                reason = f"one message of {device_id!r} mixes channel sets"
                yield DEAD_LETTERS, dead_letter(self.topic, _encode(own), reason).decode()
                continue
            yield device_id, pack(own)


def _encode(readings: list[Reading]) -> bytes | None:
    try:
        return encode_reading(readings[0]) if len(readings) == 1 else encode_reading_batch(readings)
    except Exception:  # not re-encodable (e.g. a non-finite value): keep the reason
        return None


class ParseGlobalModels(ProcessFunction):
    """JSON → ``(version, JSON)`` of a valid global version signed by the FedAvg service;
    anything else (malformed, unsigned, badly signed) → dead letters, never adopted."""

    def __init__(self, topic: str, state_dir: Path) -> None:
        self.topic = topic
        self.state_dir = state_dir

    def open(self, runtime_context) -> None:
        # Read here, on the task, not in the constructor: the key never travels in the job
        # graph. FLEAD_MODEL_SIGNING_KEY, else the state folder's file (the FedAvg service's).
        self.key = secret(self.state_dir, SIGNING_KEY)

    def process_element(self, value: bytes, ctx: ProcessFunction.Context):
        try:
            version = decode_global_params(value, self.key).version
            text = value.decode()  # verified UTF-8 JSON: kept as published
        except Exception as exc:
            yield DEAD_LETTERS, dead_letter(self.topic, value, _reason(exc)).decode()
            return
        yield version, text


class EdgeLearner(KeyedBroadcastProcessFunction):
    """Every key is one device's learner (:mod:`streaming.learner`): scores each reading with
    the newest global version, trains a local round every ``train_every`` readings or
    ``train_interval_s`` seconds (training devices only), and adopts each newer version.

    Keyed state: ``device`` (the :class:`~streaming.learner.DeviceState` as compact bytes,
    :mod:`streaming.flink_codec`: feature baselines,
    the round's buffer, histograms, the round counter) and ``timer`` (the pending round timer).
    One value each rather than one per field because every state access crosses from Python
    into the JVM; the state is bounded (see ``DeviceState``). Both expire ``state_ttl_ms`` of
    processing time after their last write (every reading writes ``device``), so a device that
    went silent costs nothing after that; if it comes back it starts a fresh learner (its rounds
    are numbered from 1 again).
    Broadcast state: the newest global version (number and JSON).

    Outputs are ``(kind, JSON)`` tuples for :class:`RouteLearnerOutput`, not side outputs:
    PyFlink drops side outputs emitted from ``on_timer``.
    """

    def __init__(
        self, config: LearnerConfig, train_interval_ms: int, topic: str, state_ttl_ms: int
    ) -> None:
        self.config = config
        self.train_interval_ms = train_interval_ms
        self.topic = topic  # of the readings, for dead letters
        self.state_ttl_ms = state_ttl_ms

    def open(self, runtime_context) -> None:
        # Processing-time TTL, refreshed on every write, expired values never returned. The
        # names carry "-ttl": Flink refuses to restore state written without TTL into a
        # descriptor with TTL, so checkpoints from before it start these states afresh instead
        # of failing the job.
        ttl = (
            StateTtlConfig.new_builder(Time.milliseconds(self.state_ttl_ms))
            .set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite)
            .set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired)
            .build()
        )
        # The device's state as compact bytes (streaming.flink_codec) rather than the pickled
        # DeviceState: pickling a bytes object is a copy. Declared as pickled bytes still: for
        # keyed state PyFlink converts a PRIMITIVE_ARRAY byte by byte (and fails on None), and
        # a checkpoint from before (a pickled DeviceState under this name) restores unchanged.
        device = ValueStateDescriptor("device-ttl", Types.PICKLED_BYTE_ARRAY())
        device.enable_time_to_live(ttl)
        timer = ValueStateDescriptor("timer-ttl", Types.LONG())
        timer.enable_time_to_live(ttl)
        self.device = runtime_context.get_state(device)
        self.timer = runtime_context.get_state(timer)
        # Caches of pure functions, not state: whether a device trains, the Detector of a
        # version, and the broadcast state's version number (refreshed whenever it changes).
        self.trains: dict[str, bool] = {}
        self.detectors: dict[int, Detector] = {0: Detector(None, self.config)}
        self.newest: int | None = None

    def _state(self) -> DeviceState | None:
        stored = self.device.value()
        if stored is None or isinstance(stored, DeviceState):  # none, or from an older job
            return stored
        return decode_state(stored)

    def _trains(self, device_id: str) -> bool:
        if device_id not in self.trains:
            self.trains[device_id] = not learner.is_held_out(
                device_id, self.config.holdout_fraction, self.config.seed
            )
        return self.trains[device_id]

    def _detector(self, ctx) -> Detector:
        """The Detector of the newest global version (version 0: the z-score rule)."""
        if self.newest is not None:  # the usual case: no call into the JVM for the state
            detector = self.detectors.get(self.newest)
            if detector is not None:
                return detector
        models = ctx.get_broadcast_state(GLOBAL_MODEL)
        if self.newest is None:  # first element after a start or a restore
            self.newest = int(models.get(VERSION)) if models.contains(VERSION) else 0
        detector = self.detectors.get(self.newest)
        if detector is None:
            # Verified when it was adopted (ParseGlobalModels); not again, so that a rotated
            # key does not strand the version the devices hold.
            model = decode_stored_global_params(models.get(MODEL))
            detector = Detector(model, self.config)
            self.detectors = {0: self.detectors[0], model.version: detector}
        return detector

    def process_element(self, value, ctx: KeyedBroadcastProcessFunction.ReadOnlyContext):
        device_id, packed = value
        state = self._state() or DeviceState()
        trains = self._trains(device_id)
        detector = self._detector(ctx)
        try:
            channels, values, labels, times = unpack(packed)
            anomalies = learner.observe_arrays(
                state, device_id, channels, values, labels, times, detector, self.config, trains
            )
        except Exception as exc:  # ChannelMismatch, or anything a reading may still provoke
            # The state is not written back: the device goes on as if the readings never came.
            payload = _encode(unpacked_readings(device_id, packed))
            reason = _reason(exc)
            if not isinstance(exc, ChannelMismatch):
                reason = f"the learner failed on these readings: {type(exc).__name__}: {reason}"
            yield DEAD_LETTER, dead_letter(self.topic, payload, reason).decode()
            return
        for anomaly in anomalies:
            yield ANOMALY, encode_anomaly(anomaly).decode()
        while trains and learner.round_due(state, self.config):
            yield from self._round(state, device_id, detector.model, ctx)
        if trains and state.buffered and self.timer.value() is None:
            due = ctx.timer_service().current_processing_time() + self.train_interval_ms
            ctx.timer_service().register_processing_time_timer(due)
            self.timer.update(due)
        self.device.update(encode_state(state))

    def on_timer(self, timestamp: int, ctx: KeyedBroadcastProcessFunction.OnTimerContext):
        self.timer.clear()
        state = self._state()
        if state is None or not state.buffered:
            return
        yield from self._round(state, ctx.get_current_key(), self._detector(ctx).model, ctx)
        self.device.update(encode_state(state))

    def _round(self, state: DeviceState, device_id: str, model: GlobalParams | None, ctx):
        now_ms = ctx.timer_service().current_processing_time()
        update = learner.train_round(state, device_id, model, self.config, now_ms)
        if update is not None:
            yield LOCAL_UPDATE, encode_local_round(update).decode()
        pending = self.timer.value()
        if pending is not None and not state.buffered:
            ctx.timer_service().delete_processing_time_timer(pending)
            self.timer.clear()

    def process_broadcast_element(self, value, ctx: KeyedBroadcastProcessFunction.Context):
        version, payload = value  # signed by the FedAvg service (ParseGlobalModels checked)
        models = ctx.get_broadcast_state(GLOBAL_MODEL)
        current = int(models.get(VERSION)) if models.contains(VERSION) else 0
        # Only a newer version is adopted: an older or repeated one (a republish on the
        # service's start, or a replayed old message) changes nothing.
        if version > current:
            models.put(VERSION, str(version))
            models.put(MODEL, payload)
            current = version
        self.newest = current


class RouteLearnerOutput(ProcessFunction):
    """Anomalies to the main output, local rounds and dead letters to their side outputs."""

    def process_element(self, value, ctx: ProcessFunction.Context):
        kind, payload = value
        if kind == LOCAL_UPDATE:
            yield LOCAL_UPDATES, payload
        elif kind == DEAD_LETTER:
            yield DEAD_LETTERS, payload
        else:
            yield payload


# --- wiring ------------------------------------------------------------------------------------


def kafka_source(settings: Settings, topic: str, group: str) -> KafkaSource:
    # Raw bytes: Python checks the UTF-8 (see the module's docstring).
    return (
        KafkaSource.builder()
        .set_bootstrap_servers(settings.kafka_bootstrap)
        .set_properties(java_client_properties(settings, "edge", FLINK_SHADED_PREFIX))
        .set_topics(topic)
        .set_group_id(group)
        .set_starting_offsets(
            KafkaOffsetsInitializer.committed_offsets(KafkaOffsetResetStrategy.EARLIEST)
        )
        .set_value_only_deserializer(ByteArraySchema())
        .build()
    )


def kafka_sink(settings: Settings, topic: str) -> KafkaSink:
    # At-least-once: a record re-sent after a restore carries the same natural key
    # (device_id, model_version) or (device_id, timestamp), so every consumer's write is an
    # idempotent upsert and nothing is counted twice.
    builder = KafkaSink.builder().set_bootstrap_servers(settings.kafka_bootstrap)
    for key, value in java_client_properties(settings, "edge", FLINK_SHADED_PREFIX).items():
        builder = builder.set_property(key, value)  # the devices' Kafka user (flead/kafka.py)
    return (
        builder.set_record_serializer(
            KafkaRecordSerializationSchema.builder()
            .set_topic(topic)
            .set_value_serialization_schema(SimpleStringSchema())
            .build()
        )
        .set_delivery_guarantee(DeliveryGuarantee.AT_LEAST_ONCE)
        .build()
    )


def environment(settings: Settings, restore_from: Path | None) -> StreamExecutionEnvironment:
    config = Configuration()
    config.set_string("python.execution-mode", settings.flink_execution_mode)
    config.set_string("python.executable", sys.executable)
    config.set_string("python.client.executable", sys.executable)
    config.set_string(
        "execution.checkpointing.dir", services.flink_checkpoint_dir(settings).as_uri()
    )
    if restore_from is not None:
        config.set_string("execution.state-recovery.path", str(restore_from))
    # Bounded restarts: with checkpointing on, Flink's default restarts forever (exponential
    # delay); a fault that survives a few restarts must fail the job, visibly, instead.
    config.set_string("restart-strategy.type", "failure-rate")
    config.set_string(
        "restart-strategy.failure-rate.max-failures-per-interval",
        str(settings.flink_restart_attempts),
    )
    config.set_string(
        "restart-strategy.failure-rate.failure-rate-interval",
        f"{int(settings.flink_restart_window_s * 1000)} ms",
    )
    config.set_string(
        "restart-strategy.failure-rate.delay", f"{int(settings.flink_restart_delay_s * 1000)} ms"
    )
    env = StreamExecutionEnvironment.get_execution_environment(config)
    env.set_parallelism(settings.flink_parallelism)
    # Exactly-once state: the learner has several input channels (the parse subtasks and the
    # broadcast models), and an at-least-once checkpoint does not align their barriers, so a
    # snapshot could hold readings read after the barrier on one channel, which a restore then
    # replays into the same state a second time. The sinks stay at-least-once (natural keys).
    env.enable_checkpointing(settings.checkpoint_interval_ms, CheckpointingMode.EXACTLY_ONCE)
    env.get_checkpoint_config().set_externalized_checkpoint_retention(
        ExternalizedCheckpointRetention.RETAIN_ON_CANCELLATION
    )
    jar_dir = settings.jars_dir / "flink"
    env.add_jars(*(jar.as_uri() for jar in sorted(jar_dir.glob("*.jar"))))
    return env


def build(env: StreamExecutionEnvironment, settings: Settings) -> None:
    """Source → transforms → sinks."""
    topics = settings.topics
    no_watermarks = WatermarkStrategy.no_watermarks()

    raw = env.from_source(
        kafka_source(settings, topics.readings, settings.consumer_group("edge")),
        no_watermarks,
        "readings",
        type_info=RAW,
    )
    readings = raw.process(ParseReadings(topics.readings), output_type=DEVICE_READINGS).name(
        "parse readings"
    )
    raw_models = env.from_source(
        kafka_source(settings, topics.global_updates, settings.consumer_group("edge-models")),
        no_watermarks,
        "global models",
        type_info=RAW,
    )
    global_models = raw_models.process(
        ParseGlobalModels(topics.global_updates, settings.state_dir)
    ).name("parse global models")

    edge_learner = EdgeLearner(
        LearnerConfig.from_settings(settings),
        int(settings.train_interval_s * 1000),
        topics.readings,
        int(settings.device_state_ttl_s * 1000),
    )
    outputs = (
        readings.key_by(lambda device_and_readings: device_and_readings[0], Types.STRING())
        .connect(global_models.broadcast(GLOBAL_MODEL))
        .process(edge_learner, output_type=LEARNER_OUTPUT)
        .name("edge learner")
        .process(RouteLearnerOutput(), output_type=Types.STRING())
        .name("route")
    )  # main output: anomalies

    outputs.sink_to(kafka_sink(settings, topics.anomalies)).name("anomalies")
    outputs.get_side_output(LOCAL_UPDATES).sink_to(kafka_sink(settings, topics.local_updates)).name(
        "local model updates"
    )
    readings.get_side_output(DEAD_LETTERS).union(
        global_models.get_side_output(DEAD_LETTERS), outputs.get_side_output(DEAD_LETTERS)
    ).sink_to(kafka_sink(settings, topics.dead_letter)).name("dead letters")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="ignore retained checkpoints and start from committed offsets",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = load_settings()
    restore_from = None if args.fresh else services.latest_flink_checkpoint(settings)
    if restore_from is not None:
        logging.info("resuming from checkpoint %s", restore_from)
    env = environment(settings, restore_from)
    build(env, settings)
    env.execute("flead-edge-learning")


if __name__ == "__main__":
    main()
