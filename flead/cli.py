"""``flead``: bring the platform up and down, replay data, and report status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from flead import db, kafka, services, status, supervision
from flead.config import Settings, load_settings
from flead.secrets import redact_url
from streaming import sources
from streaming.replay import ReplayError, delivered_counts, replay, skip_delivered


def _recorded_deploy(settings: Settings) -> str | None:
    path = settings.run_dir / "deploy"
    return path.read_text().strip() if path.exists() else None


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    # Under the supervisor's lock: a restart it has due never races these starts.
    with services.service_lock(settings):
        _start_platform(settings, args)
    if not args.no_supervise:
        outcome = supervision.ensure_supervisor(settings)
        print(f"Supervisor  {outcome}  (log {settings.log_dir / 'supervisor.log'})")
    print(f"State       {settings.state_dir}  (logs in {settings.log_dir})")
    return 0


def _start_platform(settings: Settings, args: argparse.Namespace) -> None:
    print(f"PostgreSQL  {services.ensure_postgres(settings)}  {redact_url(settings.database_url)}")
    print(f"Kafka       {services.ensure_kafka(settings)}  {settings.kafka_bootstrap}")
    created = kafka.ensure_topics(settings)
    print(
        f"Topics      {', '.join(settings.topics.all())}"
        + (f" (created {len(created)})" if created else "")
    )
    applied = db.apply_schema(settings.database_url)
    print(f"Schema      {'applied ' + ', '.join(applied) if applied else 'up to date'}")
    if settings.deploy == "cluster":
        from flead import cluster

        cluster.record_deploy(settings)
        for name, outcome in cluster.ensure_cluster(settings).items():
            print(f"{name:<19} {outcome}  (log {settings.log_dir / (name + '.log')})")
    if not args.no_streaming:
        for name, outcome in services.ensure_streaming(settings).items():
            print(f"{name:<11} {outcome}  (log {settings.log_dir / (name + '.log')})")
    if not args.no_dagster:
        from flead import orchestration  # imports Dagster only when it is used

        outcome = orchestration.ensure_dagster(settings)
        print(
            f"Dagster     {outcome['dagster-webserver']}  UI {settings.dagster_url}"
            f"  (daemon {outcome['dagster-daemon']})"
        )


def cmd_supervise(settings: Settings, _args: argparse.Namespace) -> int:
    """Run the supervisor in the foreground (``flead up`` starts it in the background)."""
    supervision.Supervisor(settings).run()
    return 0


def cmd_down(settings: Settings, _args: argparse.Namespace) -> int:
    from flead import orchestration

    # The supervisor first, so nothing stopped below is started again; then Dagster, whose
    # daemon launches runs.
    stopped = {"supervisor": supervision.stop_supervisor(settings)}
    stopped.update(orchestration.stop_dagster(settings))
    stopped.update(services.stop_streaming(settings))  # cluster mode: cancels the job
    if settings.deploy == "cluster":
        from flead import cluster

        stopped.update(cluster.stop_cluster(settings))
        cluster.record_deploy(settings, clear=True)
    stopped["kafka"] = services.stop_kafka(settings)
    stopped["postgres"] = services.stop_postgres(settings)
    for name, was_running in stopped.items():
        print(f"{name:<13} {'stopped' if was_running else 'was not running'}")
    return 0


def _source_options(settings: Settings, args: argparse.Namespace) -> tuple[dict, int | None]:
    if getattr(args, "per_sensor", False):
        if args.source != "skab":
            raise SystemExit("--per-sensor applies to --source skab only")
        return {"per_sensor": True, **({"path": Path(args.path)} if args.path else {})}, None
    if args.source == "synthetic":
        options = settings.synthetic_options(args.devices or 0, args.readings_per_device or 0)
        return options, options["num_devices"] * options["readings_per_device"]
    if args.source in {"csv", "edge_iiot"} and not args.path:
        raise SystemExit(f"--path is required for --source {args.source}")
    return ({"path": Path(args.path)} if args.path else {}), None


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    topic = args.topic or settings.topics.readings
    if args.unless_present:
        held = kafka.topic_message_counts(settings, [topic])[topic]
        if held:
            print(
                f"Replay skipped: {topic} already holds {held:,} messages "
                "(run `flead replay` to add them again)"
            )
            return 0
    options, total = _source_options(settings, args)
    report = sources.LoadReport()
    readings = sources.open_source(args.source, report=report, **options)
    if args.limit:
        readings = (r for i, r in zip(range(args.limit), readings, strict=False))
        total = min(total or args.limit, args.limit)
    if args.resume:
        try:
            config = kafka.short_lived(kafka.client_config(settings, "admin"))
            delivered = delivered_counts(config, topic)
        except ReplayError as exc:
            print(f"replay failed: {exc}", file=sys.stderr)
            return 1
        readings = skip_delivered(readings, delivered)
        skipped = sum(delivered.values())
        total = None if total is None else max(total - skipped, 0)
        print(f"Resuming: {topic} already holds {skipped:,} readings of {len(delivered):,} devices")
    try:
        result = replay(
            readings,
            kafka.producer_config(settings, "replay"),
            topic,
            rate=args.rate if args.rate is not None else settings.replay_rate,
            speedup=args.speedup if args.speedup is not None else settings.replay_speedup,
            total=total,
            progress=not args.quiet,
            batch=args.batch or settings.replay_batch,
            linger_ms=settings.replay_linger_ms,
        )
    except ReplayError as exc:
        print(f"replay failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"Replayed {result.readings:,} readings to {topic} in {result.seconds:.1f} s "
        f"({result.rate:,.0f} readings/s); bad rows skipped: {report.bad_rows:,}"
        + (f" {dict(report.reasons)}" if report.bad_rows else "")
    )
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from streaming import evaluate
    from streaming.federation import FederationConfig
    from streaming.learner import LearnerConfig

    options, _ = _source_options(settings, args)
    report = sources.LoadReport()
    readings = sources.open_source(args.source, report=report, **options)
    if args.limit:
        readings = (r for i, r in zip(range(args.limit), readings, strict=False))
    if not args.json:
        print(f"Reading {args.source}{' ' + args.path if args.path else ''} ...", flush=True)
    try:
        result = evaluate.evaluate(
            readings,
            source=args.source if not args.path else f"{args.source}:{args.path}",
            folds=args.folds,
            config=LearnerConfig.from_settings(settings),
            fed_config=FederationConfig.from_settings(settings),
            batch=args.batch or settings.replay_batch,
            progress=not args.json,
            attack=args.attack,
        )
    except ValueError as exc:
        print(f"flead evaluate: {exc}", file=sys.stderr)
        if report.bad_rows:  # often why: every row of a file in another format was skipped
            print(f"bad rows skipped: {report.bad_rows:,} {dict(report.reasons)}", file=sys.stderr)
        return 1
    if args.json:
        data = result.as_dict()
        data["load_report"] = report.as_dict()
        print(json.dumps(data, indent=2))
    else:
        if report.bad_rows:
            print(f"bad rows skipped: {report.bad_rows:,} {dict(report.reasons)}")
        print(result.table())
    return 0


def _versions(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from flead import orchestration

    if args.hours:
        first, last = args.hours
        outcome = orchestration.backfill_analytics(settings, first, last, wait=args.wait)
    else:
        outcome = orchestration.backfill_evaluations(
            settings, _versions(args.versions), wait=args.wait
        )
    print(json.dumps(outcome, indent=2))
    return 0 if outcome.get("status", "COMPLETED_SUCCESS") == "COMPLETED_SUCCESS" else 1


def cmd_wait(settings: Settings, args: argparse.Namespace) -> int:
    """Wait, with progress, until the Flink job consumed every reading and every global
    version has its evaluation summary (the end of `make run`'s main job)."""
    deadline = time.monotonic() + args.timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        lag = kafka.consumer_lag(
            settings, settings.consumer_group("edge"), settings.topics.readings
        )
        coverage = status.evaluation_coverage(settings)
        now = (lag, coverage["global_versions"], coverage["evaluated"])
        if now != last:
            last, since = now, time.monotonic()
            print(
                f"readings not yet consumed: {'?' if lag is None else f'{lag:,}'} messages; "
                f"global versions: {now[1]:,}, evaluated: {now[2]:,}",
                flush=True,
            )
        done = lag == 0 and now[1] > 0 and now[1] == now[2]
        if done and time.monotonic() - since >= args.quiet_s:
            print("done: every reading scored, every global version evaluated")
            return 0
        time.sleep(5)
    print(f"flead wait: not done after {args.timeout:.0f} s", file=sys.stderr)
    return 1


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    report = status.collect(settings, wire=args.wire)
    print(json.dumps(report, indent=2) if args.json else status.render(report))
    healthy = all(report["services"][name]["healthy"] for name in status.MANAGED_SERVICES)
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flead", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up_cmd = commands.add_parser(
        "up", help="start PostgreSQL, Kafka, topics, schema, the Flink job and FedAvg service"
    )
    up_cmd.add_argument(
        "--cluster",
        action="store_true",
        help="cluster mode (= FLEAD_DEPLOY=cluster): a Flink session cluster, Spark standalone"
        " and three Kafka brokers; later commands on the same state folder follow it",
    )
    up_cmd.add_argument(
        "--no-streaming",
        action="store_true",
        help="only the storage services: no Flink job, FedAvg or anomaly sink",
    )
    commands.add_parser("down", help="stop the services flead started (by their recorded pids)")
    up_cmd.add_argument(
        "--no-dagster", action="store_true", help="do not start the Dagster webserver and daemon"
    )
    up_cmd.add_argument(
        "--no-supervise",
        action="store_true",
        help="do not start `flead supervise` (which restarts a service that dies)",
    )
    commands.add_parser(
        "supervise",
        help="keep the started services alive: restart a dead one with backoff, count restarts,"
        " watch consumer lag, rotate logs (flead up starts it)",
    )
    backfill_cmd = commands.add_parser(
        "backfill",
        help="evaluate historical global versions (or hours of analytics) as one Dagster backfill",
    )
    backfill_cmd.add_argument(
        "--versions", help="FIRST-LAST or one version (default: all of federated_models)"
    )
    backfill_cmd.add_argument(
        "--hours",
        nargs=2,
        metavar=("FIRST", "LAST"),
        help="hourly analytics partitions instead, e.g. 2025-11-07-00:00 2025-11-07-23:00",
    )
    backfill_cmd.add_argument("--wait", action="store_true", help="wait for the backfill to end")
    replay_cmd = commands.add_parser("replay", help="replay a data set into the readings topic")
    replay_cmd.add_argument(
        "--source",
        default=None,
        choices=sources.SOURCE_NAMES,
        help="data set (default: settings.source)",
    )
    replay_cmd.add_argument("--path", help="file or folder for csv, edge_iiot, skab and wsn")
    replay_cmd.add_argument(
        "--per-sensor",
        action="store_true",
        help="skab: one univariate device per (experiment, sensor) instead of one per experiment",
    )
    replay_cmd.add_argument("--devices", type=int, help="synthetic fleet size")
    replay_cmd.add_argument("--readings-per-device", type=int, help="synthetic readings per device")
    replay_cmd.add_argument("--limit", type=int, help="replay at most this many readings")
    replay_cmd.add_argument("--rate", type=float, help="readings/s (0 = as fast as possible)")
    replay_cmd.add_argument("--speedup", type=float, help="event-time compression factor")
    replay_cmd.add_argument("--batch", type=int, help="readings of one device per message")
    replay_cmd.add_argument("--topic", help="target topic (default: the readings topic)")
    replay_cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    replay_cmd.add_argument(
        "--unless-present",
        action="store_true",
        help="do nothing if the topic already holds messages (make run)",
    )
    replay_cmd.add_argument(
        "--resume",
        action="store_true",
        help="skip each device's readings the topic already holds (after a killed replay)",
    )
    evaluate_cmd = commands.add_parser(
        "evaluate",
        help="device k-fold evaluation of every method on a labelled data set (in-process)",
    )
    evaluate_cmd.add_argument(
        "--source", default=None, choices=sources.SOURCE_NAMES, help="data set"
    )
    evaluate_cmd.add_argument("--path", help="file or folder for csv, edge_iiot, skab and wsn")
    evaluate_cmd.add_argument(
        "--per-sensor", action="store_true", help="skab: one device per (experiment, sensor)"
    )
    evaluate_cmd.add_argument("--devices", type=int, help="synthetic fleet size")
    evaluate_cmd.add_argument("--readings-per-device", type=int, help="synthetic readings/device")
    evaluate_cmd.add_argument(
        "--folds",
        type=int,
        help="device folds (default: leave-one-device-out below 20 devices, else 5)",
    )
    evaluate_cmd.add_argument("--batch", type=int, help="readings of one device per message")
    evaluate_cmd.add_argument("--limit", type=int, help="use at most this many readings")
    evaluate_cmd.add_argument(
        "--attack",
        choices=("scaled_x20", "sign_flipped", "inflated_samples", "all"),
        help="20%% of training devices poison their rounds (measures the aggregation rule)",
    )
    evaluate_cmd.add_argument("--json", action="store_true", help="print JSON")
    wait_cmd = commands.add_parser(
        "wait", help="wait until every reading is scored and every global version evaluated"
    )
    wait_cmd.add_argument("--timeout", type=float, default=1800, help="seconds (default 1800)")
    wait_cmd.add_argument(
        "--quiet-s",
        type=float,
        default=30,
        help="seconds without change before calling it done (default 30)",
    )
    status_cmd = commands.add_parser("status", help="service health, topic and table counts")
    status_cmd.add_argument("--json", action="store_true", help="print JSON")
    status_cmd.add_argument(
        "--wire",
        action="store_true",
        help="also the bytes federation put on the wire against the raw readings (reads the"
        " readings and model topics once)",
    )
    return parser


COMMANDS = {
    "up": cmd_up,
    "supervise": cmd_supervise,
    "down": cmd_down,
    "replay": cmd_replay,
    "status": cmd_status,
    "backfill": cmd_backfill,
    "wait": cmd_wait,
    "evaluate": cmd_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    # Our own progress at INFO; libraries (Dagster's alembic, Kafka clients) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for ours in ("flead", "streaming"):
        logging.getLogger(ours).setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    settings = load_settings()
    if getattr(args, "cluster", False) or (
        "FLEAD_DEPLOY" not in os.environ and _recorded_deploy(settings) == "cluster"
    ):
        # `flead up --cluster` recorded the mode: status, down, replay, ... of the same state
        # folder address the cluster without FLEAD_DEPLOY being set again.
        os.environ["FLEAD_DEPLOY"] = "cluster"
        settings = load_settings()
    if getattr(args, "source", "") is None:
        args.source = settings.source
    try:
        return COMMANDS[args.command](settings, args)
    except services.ServiceError as exc:
        print(f"flead {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
