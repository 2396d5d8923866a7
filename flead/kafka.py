"""Kafka with confluent-kafka: who connects as whom, what each may do, topics, counts and lag.

Authentication (``kafka_security = "sasl"``, the default): every service connects as its own
SASL/SCRAM user (:data:`USERS`), with its password from :func:`flead.secrets.secret` (the
environment variable ``FLEAD_KAFKA_<USER>_PASSWORD``, else a 0600 file in the state folder).
:func:`client_config` (confluent-kafka) and :func:`java_client_properties` (the Flink and Spark
Kafka connectors) are the only places a client's connection settings are made. ACLs give each
user exactly the topics and consumer groups it needs (:func:`acl_bindings`): only ``fedavg``
writes global models, ``replay`` writes only readings; ``admin`` is the super user that creates
topics, users and ACLs and that flead's own tools (status, wait, supervise) use.
``kafka_security = "none"``: plaintext and no ACLs, for a broker of your own without them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, MutableMapping

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from flead.config import Settings
from flead.secrets import env_name, secret

log = logging.getLogger(__name__)

USERS: dict[str, str] = {
    "admin": "super user: topics, users, ACLs; flead status, wait, supervise and the tests",
    "edge": "the Flink job (the devices)",
    "fedavg": "the FedAvg service: the only writer of global models",
    "sink": "the anomaly sink",
    "replay": "the replay producer: writes readings only",
    "dagster": "Dagster's sensors and Spark reading the readings topic",
}
"""SCRAM user → what connects as it."""

SECURITY_MODES = ("sasl", "none")
SCRAM_ITERATIONS = 8192
FLINK_SHADED_PREFIX = "org.apache.flink.kafka.shaded."
"""flink-sql-connector-kafka relocates the Kafka client: its login modules live here."""


def _check_security(settings: Settings) -> bool:
    """True if clients authenticate; a typo in the setting is an error, not plaintext."""
    if settings.kafka_security not in SECURITY_MODES:
        raise ValueError(
            f"FLEAD_KAFKA_SECURITY={settings.kafka_security!r}: expected one of {SECURITY_MODES}"
        )
    return settings.kafka_security == "sasl"


def password(settings: Settings, user: str) -> str:
    """The password of a flead Kafka user (never logged or printed)."""
    if user not in USERS:
        raise ValueError(f"unknown Kafka user {user!r}; flead's users are {sorted(USERS)}")
    return secret(settings.state_dir, f"kafka_{user}_password")


def client_config(settings: Settings, user: str, **overrides: object) -> dict[str, object]:
    """confluent-kafka configuration of a client connecting as ``user`` (one of
    :data:`USERS`), plus ``overrides`` (keys with dots: pass them as ``**{"linger.ms": 5}``)."""
    if user not in USERS:
        raise ValueError(f"unknown Kafka user {user!r}; flead's users are {sorted(USERS)}")
    config: dict[str, object] = {"bootstrap.servers": settings.kafka_bootstrap}
    if _check_security(settings):
        config |= {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": settings.kafka_sasl_mechanism,
            "sasl.username": user,
            "sasl.password": password(settings, user),
        }
    return {**config, **overrides}


def export_credentials(settings: Settings, env: MutableMapping[str, str] | None = None) -> None:
    """Put the passwords of ``settings``' state folder into ``env`` (the process environment)
    as ``FLEAD_KAFKA_<USER>_PASSWORD``, which :func:`flead.secrets.secret` reads first: clients
    and child processes whose settings name another state folder (tests run each pipeline in
    a temporary one) then still log in to the broker of this one."""
    env = os.environ if env is None else env
    if _check_security(settings):
        for user in USERS:
            env[env_name(f"kafka_{user}_password")] = password(settings, user)


def _jaas_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def java_client_properties(
    settings: Settings, user: str, login_module_prefix: str = ""
) -> dict[str, str]:
    """The same connection as :func:`client_config`, as Java Kafka client properties (Flink's
    KafkaSource/KafkaSink ``set_property``, Spark's ``kafka.``-prefixed options).
    ``login_module_prefix``: :data:`FLINK_SHADED_PREFIX` for Flink's relocated client."""
    config = client_config(settings, user)
    properties = {"bootstrap.servers": str(config["bootstrap.servers"])}
    if "sasl.username" in config:
        module = f"{login_module_prefix}org.apache.kafka.common.security.scram.ScramLoginModule"
        properties |= {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": settings.kafka_sasl_mechanism,
            "sasl.jaas.config": f"{module} required username={_jaas_quote(user)}"
            f" password={_jaas_quote(str(config['sasl.password']))};",
        }
    return properties


def admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings, "admin"))


def short_lived(config: dict[str, object]) -> dict[str, object]:
    """``config`` for a consumer that looks and closes (offsets, a few messages): its
    librdkafka logs go to this module's logger, served while it polls. Printed directly, a
    consumer that closes while its group-coordinator connection is still logging in shows a
    benign "GroupCoordinator: SASL authentication error ... Broker transport failure" line
    (confluentinc/confluent-kafka-python#1780) on the terminal of every ``make run``; a real
    failure still surfaces, as the exception of the call that needed the broker."""
    return {**config, "logger": log}


def producer_config(settings: Settings, user: str, **overrides: object) -> dict[str, object]:
    """An idempotent producer (acks=all, ordered retries) tuned for throughput, as ``user``."""
    return client_config(
        settings,
        user,
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 500_000,
            "queue.buffering.max.kbytes": 1_048_576,
            **overrides,
        },
    )


# --- users and ACLs --------------------------------------------------------------------------


def scram_mechanism(settings: Settings) -> ScramMechanism:
    mechanisms = {
        "SCRAM-SHA-256": ScramMechanism.SCRAM_SHA_256,
        "SCRAM-SHA-512": ScramMechanism.SCRAM_SHA_512,
    }
    try:
        return mechanisms[settings.kafka_sasl_mechanism]
    except KeyError:
        raise ValueError(
            f"FLEAD_KAFKA_SASL_MECHANISM={settings.kafka_sasl_mechanism!r}: expected"
            " SCRAM-SHA-256 or SCRAM-SHA-512"
        ) from None


def ensure_users(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create the SCRAM credentials of flead's users the broker does not know yet (the broker
    formatted them all; this adds users of a later flead version); return the ones added."""
    if not _check_security(settings):
        return []
    client = admin(settings)
    known: set[str] = set()
    for user, future in client.describe_user_scram_credentials(list(USERS)).items():
        try:
            description = future.result()
        except KafkaException as exc:
            if exc.args[0].name() != "RESOURCE_NOT_FOUND":
                raise
            continue
        mechanisms = {info.mechanism for info in description.scram_credential_infos}
        if scram_mechanism(settings) in mechanisms:
            known.add(user)
    missing = [u for u in USERS if u not in known]
    if not missing:
        return []
    info = ScramCredentialInfo(scram_mechanism(settings), SCRAM_ITERATIONS)
    upserts = [
        UserScramCredentialUpsertion(u, info, password(settings, u).encode()) for u in missing
    ]
    for future in client.alter_user_scram_credentials(upserts, request_timeout=timeout).values():
        future.result()
    return missing


def acl_bindings(settings: Settings) -> list[AclBinding]:
    """Least privilege for the topics and consumer groups of ``settings`` (a namespaced copy of
    the pipeline gets the same grants on its own names). READ and WRITE imply DESCRIBE."""
    t, group = settings.topics, settings.consumer_group
    read, write = AclOperation.READ, AclOperation.WRITE
    grants: dict[str, list[tuple[ResourceType, str, AclOperation]]] = {
        "edge": [
            (ResourceType.TOPIC, t.readings, read),
            (ResourceType.TOPIC, t.global_updates, read),
            (ResourceType.TOPIC, t.anomalies, write),
            (ResourceType.TOPIC, t.local_updates, write),
            (ResourceType.TOPIC, t.dead_letter, write),
            (ResourceType.GROUP, group("edge"), read),
            (ResourceType.GROUP, group("edge-models"), read),
        ],
        "fedavg": [
            (ResourceType.TOPIC, t.local_updates, read),
            (ResourceType.TOPIC, t.global_updates, write),
            (ResourceType.TOPIC, t.dead_letter, write),
            (ResourceType.GROUP, group("fedavg"), read),
        ],
        "sink": [
            (ResourceType.TOPIC, t.anomalies, read),
            (ResourceType.TOPIC, t.dead_letter, write),
            (ResourceType.GROUP, group("anomaly-sink"), read),
        ],
        "replay": [(ResourceType.TOPIC, t.readings, write)],
        "dagster": [
            (ResourceType.TOPIC, t.readings, read),
            # The readings sensor's consumer assigns partitions; it never joins or commits.
            (ResourceType.GROUP, "flead-dagster-readings-sensor", read),
        ],
    }
    bindings = [
        AclBinding(
            kind,
            name,
            ResourcePatternType.LITERAL,
            f"User:{user}",
            "*",
            operation,
            AclPermissionType.ALLOW,
        )
        for user, items in grants.items()
        for kind, name, operation in items
    ]
    # Spark's Kafka source names its consumer groups spark-kafka-relation-<uuid>-...
    bindings.append(
        AclBinding(
            ResourceType.GROUP,
            "spark-kafka-",
            ResourcePatternType.PREFIXED,
            "User:dagster",
            "*",
            read,
            AclPermissionType.ALLOW,
        )
    )
    return bindings


def ensure_acls(
    settings: Settings, timeout: float = 30.0, client: AdminClient | None = None
) -> None:
    """Grant :func:`acl_bindings` (creating an existing ACL again changes nothing). On a
    cluster where flead's admin may not create ACLs, warn: its owner grants them."""
    if not _check_security(settings):
        return
    client = client or admin(settings)  # must outlive its futures
    futures = client.create_acls(acl_bindings(settings), request_timeout=timeout)
    for future in futures.values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() not in {"CLUSTER_AUTHORIZATION_FAILED", "SECURITY_DISABLED"}:
                raise
            log.warning(
                "cannot create Kafka ACLs (%s): grant flead's users their topics yourself",
                exc.args[0].name(),
            )
            return


def check_access(settings: Settings, timeout: float = 15.0) -> None:
    """Raise ``RuntimeError`` with what to do if the admin user cannot reach the cluster (an
    unauthenticated broker of an earlier flead, a wrong password, ...)."""
    config = client_config(settings, "admin")
    errors: list[str] = []
    config["error_cb"] = lambda err: errors.append(str(err))
    try:
        AdminClient(config).list_topics(timeout=timeout)
    except KafkaException as exc:
        detail = "; ".join(dict.fromkeys(errors)) or str(exc)
        raise RuntimeError(
            f"Kafka at {settings.kafka_bootstrap} did not accept flead's admin user over"
            f" {settings.kafka_security}: {detail}. A broker started by an earlier flead"
            " without authentication: `flead down` then `flead up` (its data folder may then"
            " need re-formatting: the message says how); a broker of your own without"
            " authentication: FLEAD_KAFKA_SECURITY=none."
        ) from None


# --- topics ----------------------------------------------------------------------------------


def ensure_topics(
    settings: Settings, names: list[str] | None = None, timeout: float = 30.0
) -> list[str]:
    """Create the missing topics (all of FLEAD's by default) and grant the ACLs of
    ``settings``; return the topics created."""
    client = admin(settings)
    wanted = names if names is not None else settings.topics.all()
    existing = set(client.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(
            name,
            num_partitions=settings.kafka_partitions,
            replication_factor=settings.kafka_replication,
            config={
                "retention.ms": str(settings.kafka_retention_ms),
                "retention.bytes": str(settings.kafka_retention_bytes),
                # With producers' acks=all: a write is acknowledged once this many replicas
                # hold it (cluster mode: 2 of 3, so losing one broker loses nothing).
                "min.insync.replicas": str(settings.kafka_min_insync_replicas),
            },
        )
        for name in wanted
        if name not in existing
    ]
    ensure_acls(settings, timeout=timeout, client=client)
    if not new:
        return []
    for future in client.create_topics(new, request_timeout=timeout).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    created = [t.topic for t in new]
    _wait_for_leaders(settings, created, timeout)
    return created


def _wait_for_leaders(settings: Settings, topics: list[str], timeout: float) -> None:
    """Return once every partition of ``topics`` answers offset requests: right after creation
    its leader is not elected yet, and the first client would get NOT_LEADER_FOR_PARTITION."""
    config = client_config(settings, "admin", **{"group.id": "flead-admin"})
    consumer = Consumer(short_lived(config))
    deadline = time.monotonic() + timeout
    try:
        for topic in topics:
            for partition in range(settings.kafka_partitions):
                while True:
                    try:
                        consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5)
                        break
                    except KafkaException:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
    finally:
        consumer.close()


def _per_topic(
    settings: Settings,
    names: list[str],
    measure: Callable[[Consumer, TopicPartition], int],
    timeout: float,
) -> dict[str, int | None]:
    """``measure`` summed over each topic's partitions (None for a missing topic), with one
    consumer that only looks: it is assigned partitions and never commits."""
    metadata = admin(settings).list_topics(timeout=timeout)
    consumer = Consumer(
        short_lived(
            client_config(
                settings, "admin", **{"group.id": "flead-status", "enable.auto.commit": False}
            )
        )
    )
    try:
        totals: dict[str, int | None] = {}
        for name in names:
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                totals[name] = None
                continue
            totals[name] = sum(measure(consumer, TopicPartition(name, p)) for p in topic.partitions)
        return totals
    finally:
        consumer.close()


def topic_message_counts(
    settings: Settings, names: list[str] | None = None, timeout: float = 10.0
) -> dict[str, int | None]:
    """Messages held per topic (high minus low watermark over partitions); None if missing."""

    def held(consumer: Consumer, partition: TopicPartition) -> int:
        low, high = consumer.get_watermark_offsets(partition, timeout=timeout)
        return high - low

    wanted = names if names is not None else settings.topics.all()
    return _per_topic(settings, wanted, held, timeout)


def topic_bytes(
    settings: Settings, names: list[str], timeout: float = 30.0
) -> dict[str, int | None]:
    """Bytes of the keys and values each topic holds now (None if missing): its messages up to
    each partition's high watermark at the call, read once. Reads every byte, so it takes
    about a second per few hundred MB on a local broker; ``flead status --wire`` only."""
    return _per_topic(
        settings, names, lambda consumer, tp: _partition_bytes(consumer, tp, timeout), timeout
    )


def _partition_bytes(consumer: Consumer, partition: TopicPartition, timeout: float) -> int:
    low, high = consumer.get_watermark_offsets(partition, timeout=timeout)
    if high <= low:
        return 0
    start = TopicPartition(partition.topic, partition.partition, low)
    consumer.assign([start])
    total, deadline = 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = consumer.consume(1000, timeout=1.0)
        for message in messages:
            if message.error() is not None or message.offset() >= high:
                continue
            total += len(message.value() or b"") + len(message.key() or b"")
            if message.offset() == high - 1:
                return total
        # The last offsets may hold no message (compacted away, a transaction marker).
        if not messages and consumer.position([start])[0].offset >= high:
            return total
    raise TimeoutError(f"{partition.topic}[{partition.partition}]: not read to {high} in time")


def group_offsets(
    settings: Settings, group: str, topic: str, timeout: float = 10.0
) -> tuple[int, int] | None:
    """(committed, end): the sums over ``topic``'s partitions of ``group``'s committed offsets
    and of the high watermarks; None when the topic is missing or the group has not committed
    on a partition that holds messages (its lag is unknown)."""
    consumer = Consumer(short_lived(client_config(settings, "admin", **{"group.id": group})))
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return None
        partitions = [TopicPartition(topic, p) for p in metadata.partitions]
        committed = end = 0
        for tp in consumer.committed(partitions, timeout=timeout):
            _, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            if tp.offset < 0:
                if high > 0:
                    return None
                continue
            committed += tp.offset
            end += high
        return committed, end
    finally:
        consumer.close()


def consumer_lag(settings: Settings, group: str, topic: str, timeout: float = 10.0) -> int | None:
    """Messages of ``topic`` that ``group`` has not committed yet; None before its first
    commit on a partition that holds messages."""
    offsets = group_offsets(settings, group, topic, timeout)
    return None if offsets is None else offsets[1] - offsets[0]


class DeadLetters:
    """A consumer's refused records on their way to the dead-letter topic.

    :meth:`send` produces a record's bytes with the reason (:func:`streaming.messages.dead_letter`);
    :meth:`confirm` waits until Kafka acknowledged every one, and raises otherwise: a consumer
    commits the offset of a refused record only after that (``flush`` alone also counts a failed
    delivery as gone, hence the delivery reports).
    """

    def __init__(self, producer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.count = 0
        self.errors: list[str] = []

    def send(self, message, reason: str) -> None:
        from streaming.messages import dead_letter

        self.count += 1
        log.warning(
            "dead letter from %s [%d] @%d: %s",
            message.topic(),
            message.partition(),
            message.offset(),
            reason,
        )
        self.producer.produce(
            self.topic,
            dead_letter(message.topic(), message.value(), reason),
            on_delivery=self._delivered,
        )

    def confirm(self, timeout_s: float = 30.0) -> None:
        if self.producer.flush(timeout_s) or self.errors:
            raise RuntimeError(f"dead letters were not acknowledged by Kafka: {self.errors[:3]}")

    def _delivered(self, error, _message) -> None:
        if error is not None:
            self.errors.append(str(error))
