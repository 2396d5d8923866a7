"""Grafana: provisioning, dashboards, alert rules, and every panel's and alert rule's SQL run the
way Grafana runs it.

The panel queries are expanded with a port of Grafana's PostgreSQL macro engine
(``pkg/tsdb/grafana-postgresql-datasource/macros.go`` and the global substitutions of
``sqleng.Interpolate``; checked below against the cases of Grafana's own ``macros_test.go``) and
run through the provisioned datasource's read-only role ``flead_grafana`` against a database
filled by the end-to-end pipeline (the ``filled_database_url`` fixture of ``conftest.py``).
"""

from __future__ import annotations

import calendar
import json
import math
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import quote, urlsplit

import psycopg
import pytest
import yaml
from psycopg import errors

from flead import db
from flead.config import REPO_ROOT, load_settings

GRAFANA = REPO_ROOT / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_FILE = GRAFANA / "provisioning" / "datasources" / "flead.yaml"
PROVIDER_FILE = GRAFANA / "provisioning" / "dashboards" / "flead.yaml"
ALERT_FILES = sorted((GRAFANA / "provisioning" / "alerting").glob("*.yaml"))
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
READER_MIGRATION = REPO_ROOT / "sql" / "004_grafana_reader.sql"
READER = "flead_grafana"
TABLES_READ = (
    "local_models",
    "federated_models",
    "anomalies",
    "model_evaluations",
    "model_evaluation_summaries",
    "hourly_device_analytics",
    "accuracy_reports",
    "prequential_evaluations",
    "prequential_metrics",
)


# --- Grafana's PostgreSQL macro engine, ported ------------------------------------------------

_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")  # macros.go: sExpr
_DATE_UNIT = re.compile(r"^(\d+)([dwMy])$")  # gtime: dateUnitPattern
_GO_DURATION_PART = re.compile(r"(\d*\.?\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000}
_GO_UNIT_NS |= {"s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
_SECOND_NS = 10**9
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_NS = 86_400 * _SECOND_NS


class MacroError(ValueError):
    pass


def _rfc3339nano(t: datetime) -> str:
    """Go's ``t.UTC().Format(time.RFC3339Nano)``: fraction without trailing zeros, ``Z``."""
    t = t.astimezone(UTC)
    fraction = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def _unix(t: datetime) -> int:
    return math.floor(t.timestamp())


def _unix_nano(t: datetime) -> int:
    t = t.astimezone(UTC)
    return _unix(t.replace(microsecond=0)) * _SECOND_NS + t.microsecond * 1_000


def _go_float(value: float) -> str:
    """Go's ``fmt.Sprintf("%v", float64)``: shortest digits, %e from exponent -5 or 6 up."""
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    parsed = Decimal(repr(abs(float(value)))).as_tuple()
    digits = "".join(map(str, parsed.digits))
    point = len(digits) + parsed.exponent  # value = 0.<digits> × 10^point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    exponent = point - 1
    if exponent < -4 or exponent >= 6:
        mantissa = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _format_interval(ns: int) -> str:
    """gtime.FormatInterval: the value of ``$__interval``."""
    for unit, size in (("y", 365 * _DAY_NS), ("d", _DAY_NS), ("h", 3600 * _SECOND_NS)):
        if ns >= size:
            return f"{ns // size}{unit}"
    for unit, size in (("m", 60 * _SECOND_NS), ("s", _SECOND_NS), ("ms", 1_000_000)):
        if ns >= size:
            return f"{ns // size}{unit}"
    return "1ms"


def _go_add_date(t: datetime, years: int, months: int, days: int) -> datetime:
    """Go's ``time.AddDate`` with its normalisation (Jan 31 + 1 month = Mar 2 or 3)."""
    month0 = t.month - 1 + months
    first = t.replace(year=t.year + years + month0 // 12, month=month0 % 12 + 1, day=1)
    return first + timedelta(days=t.day - 1 + days)


def _go_parse_duration(text: str) -> int:
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text.removeprefix("+"))
    if body == "0":
        return 0
    parts = _GO_DURATION_PART.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise MacroError(f"time: invalid duration {text!r}")
    return sign * round(sum(float(number) * _GO_UNIT_NS[unit] for number, unit in parts))


def _parse_interval(text: str, now: datetime) -> int:
    """gtime.ParseInterval: Go durations, or d/w/M/y relative to the current UTC time."""
    match = _DATE_UNIT.match(text)
    if match is None:
        return _go_parse_duration(text)
    num, unit = int(match.group(1)), match.group(2)
    years, months, days = {"d": (0, 0, num), "w": (0, 0, 7 * num)}.get(unit, (0, 0, 0))
    if unit == "M":
        months = num
    elif unit == "y":
        years = num
    delta = _go_add_date(now, years, months, days) - now
    return (delta.days * 86_400 + delta.seconds) * _SECOND_NS + delta.microseconds * 1_000


def _check_fill(fill: str) -> None:
    """sqleng.SetupFillmode: NULL, previous or a number (the fill itself is not SQL)."""
    if fill not in {"NULL", "previous"}:
        try:
            float(fill)
        except ValueError:
            raise MacroError(f"error parsing fill value {fill}") from None


def expand_grafana_macros(
    sql: str,
    time_from: datetime,
    time_to: datetime,
    interval_seconds: float,
    *,
    timescaledb: bool = False,
    now: datetime | None = None,
) -> str:
    """``sql`` as Grafana's PostgreSQL datasource sends it to the server.

    First the global substitutions of ``sqleng.Interpolate`` (``$__interval_ms``,
    ``$__interval``, ``$__unixEpochFrom()``, ``$__unixEpochTo()``), then the macro engine of
    ``macros.go``: every ``$name(args)``, arguments split on ``,`` and trimmed of spaces only.
    ``timescaledb`` is the datasource's TimescaleDB switch (FLEAD's is off); ``now`` is the
    wall time that d/w/M/y intervals are measured from.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    interval_ns = round(interval_seconds * _SECOND_NS)
    sql = sql.replace("$__interval_ms", str(interval_ns // 1_000_000))
    sql = sql.replace("$__interval", _format_interval(interval_ns))
    sql = sql.replace("$__unixEpochFrom()", str(_unix(time_from)))
    sql = sql.replace("$__unixEpochTo()", str(_unix(time_to)))
    source = sql

    def group(column: str, args: list[str], *, epoch: bool) -> str:
        if len(args) < 2:
            raise MacroError("macro needs time column and interval and optional fill value")
        seconds = _parse_interval(args[1].strip("'"), now) / _SECOND_NS
        if len(args) == 3:
            _check_fill(args[2])
        if epoch:
            return f"floor(({column})/{_go_float(seconds)})*{_go_float(seconds)}"
        if timescaledb:
            return f"time_bucket('{seconds:.3f}s',{column})"
        return f"floor(extract(epoch from {column})/{_go_float(seconds)})*{_go_float(seconds)}"

    def evaluate(name: str, args: list[str]) -> str:
        column = args[0]
        match name:
            case "__time":
                return f'{column} AS "time"'
            case "__timeEpoch":
                return f'extract(epoch from {column}) as "time"'
            case "__timeFilter":
                return f"{column} BETWEEN '{_rfc3339nano(time_from)}' AND '{_rfc3339nano(time_to)}'"
            case "__timeFrom":
                return f"'{_rfc3339nano(time_from)}'"
            case "__timeTo":
                return f"'{_rfc3339nano(time_to)}'"
            case "__timeGroup":
                return group(column, args, epoch=False)
            case "__timeGroupAlias":
                return group(column, args, epoch=False) + ' AS "time"'
            case "__unixEpochFilter":
                return f"{column} >= {_unix(time_from)} AND {column} <= {_unix(time_to)}"
            case "__unixEpochNanoFilter":
                return f"{column} >= {_unix_nano(time_from)} AND {column} <= {_unix_nano(time_to)}"
            case "__unixEpochNanoFrom":
                return str(_unix_nano(time_from))
            case "__unixEpochNanoTo":
                return str(_unix_nano(time_to))
            case "__unixEpochGroup":
                return group(column, args, epoch=True)
            case "__unixEpochGroupAlias":
                return group(column, args, epoch=True) + ' AS "time"'
        raise MacroError(f'unknown macro "{name}"')

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "__timeGroup":
            # Before Grafana 5.3 $__timeGroup added the alias: still so when a ',' follows.
            index = source.find(match.group(0))
            if index >= 0:
                index += len(match.group(0))
                if len(source) > index and source[index] == ",":
                    name = "__timeGroupAlias"
        return evaluate(name, [arg.strip(" ") for arg in match.group(2).split(",")])

    return _MACRO.sub(replace, sql)


def test_macro_expansion_matches_grafanas_own_cases() -> None:
    """The cases of Grafana's ``macros_test.go`` (PostgreSQL datasource)."""
    start = datetime(2018, 4, 12, 18, 0, tzinfo=UTC)
    end = start + timedelta(minutes=5)

    def expand(sql: str, timescaledb: bool = False) -> str:
        return expand_grafana_macros(sql, start, end, 60, timescaledb=timescaledb)

    assert expand("select $__time(time_column)") == 'select time_column AS "time"'
    assert expand("select min($__time(time_column))") == 'select min(time_column AS "time")'
    assert expand("WHERE $__timeFilter(time_column)") == (
        "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"
    )
    assert expand("select $__timeFrom()") == "select '2018-04-12T18:00:00Z'"
    assert expand("select $__timeTo()") == "select '2018-04-12T18:05:00Z'"
    assert expand("SELECT $__timeGroup(time_column,'5m'), value") == (
        'SELECT floor(extract(epoch from time_column)/300)*300 AS "time", value'
    )
    assert expand("SELECT $__timeGroup(time_column,'5m') as time, value") == (
        "SELECT floor(extract(epoch from time_column)/300)*300 as time, value"
    )
    assert expand("SELECT $__timeGroup(time_column,'5m')") == (
        "SELECT floor(extract(epoch from time_column)/300)*300"
    )
    assert expand("$__timeGroupAlias(time_column , '5m')") == (
        'floor(extract(epoch from time_column)/300)*300 AS "time"'
    )
    assert expand("GROUP BY $__timeGroup(time_column , '5m')", timescaledb=True) == (
        "GROUP BY time_bucket('300.000s',time_column)"
    )
    assert expand("GROUP BY $__timeGroup(time_column , '12d')", timescaledb=True) == (
        "GROUP BY time_bucket('1036800.000s',time_column)"
    )
    assert expand("GROUP BY $__timeGroup(time_column , '20ms')", timescaledb=True) == (
        "GROUP BY time_bucket('0.020s',time_column)"
    )
    assert expand("select $__unixEpochFilter(time)") == (
        f"select time >= {_unix(start)} AND time <= {_unix(end)}"
    )
    assert expand("select $__unixEpochNanoFilter(time)") == (
        f"select time >= {_unix(start) * 10**9} AND time <= {_unix(end) * 10**9}"
    )
    assert expand("SELECT $__unixEpochGroupAlias(time_column+time_adjustment,'5m')") == (
        'SELECT floor((time_column+time_adjustment)/300)*300 AS "time"'
    )
    half = datetime(1960, 2, 1, 7, 0, 0, 500_000, tzinfo=UTC)
    assert expand_grafana_macros("$__timeFrom()", half, half, 1) == "'1960-02-01T07:00:00.5Z'"
    # sqleng.Interpolate's global substitutions, and Go's float formatting of big intervals
    assert expand("$__interval $__interval_ms $__unixEpochFrom() $__unixEpochTo()") == (
        f"1m 60000 {_unix(start)} {_unix(end)}"
    )
    assert expand("$__timeGroup(t, 30d)") == "floor(extract(epoch from t)/2.592e+06)*2.592e+06"
    assert expand("$__timeGroup(t, 250ms)") == "floor(extract(epoch from t)/0.25)*0.25"
    with pytest.raises(MacroError):
        expand("$__nope(x)")
    with pytest.raises(MacroError):
        expand("$__timeGroup(t,\n1m)")  # only spaces are trimmed from arguments


# --- provisioning and dashboard files -------------------------------------------------------


def _datasource() -> dict:
    return yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"][0]


def _dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARD_FILES}


def _panels() -> list[tuple[str, dict]]:
    return [(name, p) for name, board in _dashboards().items() for p in board["panels"]]


def _panel_id(param: tuple[str, dict]) -> str:
    name, p = param
    return f"{name.removesuffix('.json')}#{p['id']}"


def _go_expand_env(value: str, env: dict[str, str]) -> str:
    """Go's ``os.ExpandEnv`` as Grafana applies it to provisioning values."""
    return re.sub(
        r"\$(?:\{([^}]*)\}|([A-Za-z0-9_]+))",
        lambda m: env.get(m.group(1) or m.group(2), ""),
        value,
    )


def test_datasource_provisioning_uses_the_read_only_role() -> None:
    ds = _datasource()
    assert ds["type"] == "grafana-postgresql-datasource"
    assert ds["user"] == READER
    assert ds["uid"] == "flead-postgres"
    assert ds["url"] == "$FLEAD_GRAFANA_DB_HOST"
    assert ds["jsonData"]["database"] == "$FLEAD_GRAFANA_DB_NAME"
    assert ds["secureJsonData"]["password"] == "$FLEAD_GRAFANA_DB_PASSWORD"
    # TimescaleDB mode would turn $__timeGroup into time_bucket(), unknown to plain PostgreSQL
    assert ds["jsonData"]["timescaledb"] is False


def test_dashboard_provider_and_compose_mounts_agree() -> None:
    provider = yaml.safe_load(PROVIDER_FILE.read_text())["providers"][0]
    assert provider["type"] == "file"
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if ":" in v}
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    env = grafana["environment"]
    assert {"FLEAD_GRAFANA_DB_HOST", "FLEAD_GRAFANA_DB_NAME", "FLEAD_GRAFANA_DB_PASSWORD"} <= set(
        env
    )
    services = set(compose["services"])
    assert {"kafka", "timescaledb", "grafana", "jobmanager", "taskmanager"} <= services
    assert {"fedavg", "anomaly-sink"} <= services


def test_dashboards_are_well_formed() -> None:
    boards = _dashboards()
    assert set(boards) == {
        "flead-overview.json",
        "flead-model-quality.json",
        "flead-analytics.json",
    }
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    ds = _datasource()
    for name, board in boards.items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        # Replayed data carries event times of the past: a wide default range shows it.
        assert board["time"] == {"from": "now-2y", "to": "now"}, name
        for p in board["panels"]:
            assert p["targets"], f"{name} panel {p['id']} has no target"
            for t in p["targets"]:
                assert t["rawSql"].strip() and t.get("rawQuery") is True, (name, p["id"])
                assert t["format"] in {"table", "time_series"}, (name, p["id"])
                assert t["datasource"] == {"type": ds["type"], "uid": ds["uid"]}, (name, p["id"])
                assert "time_bucket" not in t["rawSql"], (name, p["id"])
                # only macros Grafana knows, with arguments it can parse
                expanded = expand_grafana_macros(t["rawSql"], _EPOCH, _EPOCH, 60)
                assert "$" not in expanded, (name, p["id"], expanded)
    titles = {p["title"] for p in boards["flead-overview.json"]["panels"]}
    assert {
        "Total local models",
        "Global models created",
        "Active devices (last hour)",
        "Latest global accuracy",
        "Training rate per minute",
        "Global accuracy trend",
        "Top devices by training count",
        "Recent federated models",
        "Anomalies per hour by severity",
        "Recent anomalies",
        "Anomalies per hour by detector",
    } <= titles
    quality = {p["title"] for p in boards["flead-model-quality.json"]["panels"]}
    assert {
        "Held-out vs prequential F1 and MCC per version",
        "Version-to-version swing (change from the previous version)",
    } <= quality


def test_reader_migration_is_database_independent() -> None:
    text = READER_MIGRATION.read_text()
    assert "current_database()" in text and "pg_roles" in text
    assert re.search(r"ON DATABASE\s+flead\b", text, re.IGNORECASE) is None


# --- the panels' SQL against a database filled by the pipeline -------------------------------

_RELATIVE = re.compile(r"^now(?:-(\d+)([smhdwMy]))?$")


def _relative_time(text: str, now: datetime) -> datetime:
    """Grafana's dateMath for the ``now-N<unit>`` forms the dashboards use."""
    match = _RELATIVE.match(text)
    assert match, f"unsupported time {text!r}"
    if match.group(1) is None:
        return now
    n, unit = int(match.group(1)), match.group(2)
    if unit in "My":  # moment's subtract: the day is clamped to the end of the month
        month0 = now.year * 12 + now.month - 1 - (12 * n if unit == "y" else n)
        year, month = divmod(month0, 12)
        day = min(now.day, calendar.monthrange(year, month + 1)[1])
        return now.replace(year=year, month=month + 1, day=day)
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}[unit]
    return now - timedelta(seconds=n * seconds)


def _round_interval(ms: float) -> float:
    """Grafana's interval rounding (gtime.RoundInterval), in milliseconds."""
    steps = [
        (10, 1), (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500),
        (1_500, 1_000), (3_500, 2_000), (7_500, 5_000), (12_500, 10_000), (17_500, 15_000),
        (25_000, 20_000), (45_000, 30_000), (90_000, 60_000), (210_000, 120_000),
        (450_000, 300_000), (750_000, 600_000), (1_050_000, 900_000), (1_500_000, 1_200_000),
        (2_700_000, 1_800_000), (5_400_000, 3_600_000), (9_000_000, 7_200_000),
        (16_200_000, 10_800_000), (32_400_000, 21_600_000), (86_400_000, 43_200_000),
        (172_800_000, 86_400_000), (604_800_000, 86_400_000), (1_814_400_000, 604_800_000),
    ]  # fmt: skip
    for limit, step in steps:
        if ms <= limit:
            return step
    return 2_592_000_000 if ms < 3_628_800_000 else 31_536_000_000


def _panel_interval_seconds(panel: dict, start: datetime, end: datetime) -> float:
    """The ``$__interval`` Grafana computes: range / data points, rounded, at least the
    panel's (or else the datasource's) minimum interval."""
    points = panel.get("maxDataPoints", 1000)
    ms = _round_interval((end - start).total_seconds() * 1000 / points)
    low = panel.get("interval") or _datasource()["jsonData"].get("timeInterval")
    low_ms = _go_parse_duration(low) / 1e6 if low else 1
    return max(ms, low_ms) / 1000


@pytest.fixture
def grafana_reader_url(filled_database_url: str) -> str:
    """The filled database as Grafana's provisioned datasource reaches it: the provisioning
    file expanded with Go's os.ExpandEnv, the way Grafana reads it."""
    db.apply_schema(filled_database_url)  # the reader role's migration (a no-op when applied)
    parts = urlsplit(filled_database_url)
    env = {
        "FLEAD_GRAFANA_DB_HOST": f"{parts.hostname}:{parts.port or 5432}",
        "FLEAD_GRAFANA_DB_NAME": parts.path.lstrip("/"),
        "FLEAD_GRAFANA_DB_PASSWORD": _reader_password(),
    }
    ds = _datasource()
    host = _go_expand_env(ds["url"], env)
    database = _go_expand_env(ds["jsonData"]["database"], env)
    password = _go_expand_env(ds["secureJsonData"]["password"], env)
    sslmode = ds["jsonData"].get("sslmode", "disable")
    return f"postgresql://{ds['user']}:{quote(password)}@{host}/{database}?sslmode={sslmode}"


@pytest.mark.integration
@pytest.mark.parametrize("board_and_panel", _panels(), ids=_panel_id)
def test_panel_sql_returns_rows(board_and_panel: tuple[str, dict], grafana_reader_url: str):
    """Each panel's SQL, expanded as Grafana does for the dashboard's default time range,
    runs as the read-only role and returns rows; it also runs at coarse and fine intervals."""
    name, panel = board_and_panel
    board = _dashboards()[name]
    now = datetime.now(UTC)
    start = _relative_time(board["time"]["from"], now)
    end = _relative_time(board["time"]["to"], now)
    interval = _panel_interval_seconds(panel, start, end)
    with psycopg.connect(grafana_reader_url, connect_timeout=10) as conn:
        for target in panel["targets"]:
            sql = expand_grafana_macros(target["rawSql"], start, end, interval, now=now)
            rows = conn.execute(sql).fetchall()
            assert rows, f"{name} panel {panel['id']} ({panel['title']}) returned no rows:\n{sql}"
            assert any(v is not None for row in rows for v in row), (name, panel["id"], rows)
            for seconds in (1, 60, 3600, 86_400, 30 * 86_400, 365 * 86_400):
                conn.execute(expand_grafana_macros(target["rawSql"], start, end, seconds))


# --- alert rules ---------------------------------------------------------------------------

_ALERT_STATES = {"NoData", "Alerting", "OK", "KeepLast"}
_ERROR_STATES = {"Error", "Alerting", "OK", "KeepLast"}


def _alert_rules() -> list[dict]:
    rules = []
    for path in ALERT_FILES:
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == 1, path.name
        for group in doc["groups"]:
            rules.extend(group["rules"])
    return rules


def _alert_rule(uid: str) -> dict:
    return next(r for r in _alert_rules() if r["uid"] == uid)


def _alert_queries() -> list[tuple[str, dict]]:
    """Every datasource query of every rule (expressions run inside Grafana, not as SQL)."""
    return [
        (rule["uid"], item)
        for rule in _alert_rules()
        for item in rule["data"]
        if item["datasourceUid"] != "__expr__"
    ]


def _threshold(rule: dict) -> tuple[str, float]:
    """The evaluator of the rule's condition (a threshold expression)."""
    condition = next(d for d in rule["data"] if d["refId"] == rule["condition"])
    assert condition["model"]["type"] == "threshold"
    (evaluator,) = [c["evaluator"] for c in condition["model"]["conditions"]]
    (value,) = evaluator["params"]
    return evaluator["type"], float(value)


def _alert_sql(item: dict, now: datetime, wide: bool = False) -> str:
    """The query as Grafana's alert evaluation sends it: the rule's relative time range
    (seconds before now), interval 1 s (alerting's intervalMs default); ``wide``: from 1970."""
    span = item["relativeTimeRange"]
    start = _EPOCH if wide else now - timedelta(seconds=span["from"])
    end = now - timedelta(seconds=span["to"])
    return expand_grafana_macros(item["model"]["rawSql"], start, end, 1, now=now)


def test_alert_rules_are_well_formed() -> None:
    """Grafana's file provisioning format for alert rules: apiVersion 1, groups with an
    interval and a folder, rules whose condition is one of their refIds, datasource queries on
    the provisioned datasource (table format, macros Grafana knows) and expressions that refer
    to earlier refIds."""
    assert [p.name for p in ALERT_FILES] == ["flead-alerts.yaml"]
    doc = yaml.safe_load(ALERT_FILES[0].read_text())
    assert set(doc) == {"apiVersion", "groups"}  # contact points are left to the user
    provider = yaml.safe_load(PROVIDER_FILE.read_text())["providers"][0]
    ds = _datasource()
    uids = set()
    for group in doc["groups"]:
        assert group["orgId"] == 1 and group["name"] and group["interval"]
        assert group["folder"] == provider["folder"]  # beside the dashboards
        for rule in group["rules"]:
            assert rule["uid"] not in uids
            uids.add(rule["uid"])
            assert len(rule["uid"]) <= 40 and rule["title"]
            ref_ids = [d["refId"] for d in rule["data"]]
            assert len(ref_ids) == len(set(ref_ids)) and rule["condition"] in ref_ids
            assert rule["noDataState"] in _ALERT_STATES
            assert rule["execErrState"] in _ERROR_STATES
            assert rule["labels"]["team"] == "flead"
            seen = set()
            for item in rule["data"]:
                model = item["model"]
                assert model["refId"] == item["refId"]
                if item["datasourceUid"] == "__expr__":
                    assert model["type"] in {"reduce", "threshold", "math"}
                    assert model.get("expression") in seen, (rule["uid"], item["refId"])
                else:
                    assert item["datasourceUid"] == ds["uid"]
                    assert item["relativeTimeRange"]["from"] > item["relativeTimeRange"]["to"]
                    assert model["rawQuery"] is True and model["format"] == "table"
                    expanded = expand_grafana_macros(model["rawSql"], _EPOCH, _EPOCH, 1)
                    assert "$" not in expanded and "time_bucket" not in expanded
                seen.add(item["refId"])
            _threshold(rule)
    assert uids == {
        "flead-critical-anomalies",
        "flead-quality-drop",
        "flead-service-restarts",
        "flead-lag-growing",
    }


@pytest.mark.integration
@pytest.mark.parametrize("uid_and_query", _alert_queries(), ids=lambda q: f"{q[0]}#{q[1]['refId']}")
def test_alert_rule_sql_runs(uid_and_query: tuple[str, dict], grafana_reader_url: str) -> None:
    """Each alert query, expanded for the rule's own time range, runs as the read-only role
    and gives what Grafana makes alert instances of: string columns (labels) and exactly one
    numeric column (the value). Over all the data (from 1970) it returns rows."""
    uid, item = uid_and_query
    now = datetime.now(UTC)
    with psycopg.connect(grafana_reader_url, connect_timeout=10) as conn:
        for wide in (False, True):
            cursor = conn.execute(_alert_sql(item, now, wide=wide))
            rows = cursor.fetchall()
            types = {d.name: d.type_code for d in cursor.description}
            numeric = [n for n, t in types.items() if t in _NUMERIC_OIDS]
            assert len(numeric) == 1, (uid, types)
            assert set(types) - set(numeric) <= {n for n, t in types.items() if t == _TEXT_OID}
        assert rows, f"alert rule {uid} returned no rows over all the data"
        assert all(row[list(types).index(numeric[0])] is not None for row in rows), rows


_TEXT_OID = 25
_NUMERIC_OIDS = {20, 21, 23, 700, 701, 1700}  # int8, int2, int4, float4, float8, numeric


def _reader_query(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(_as_reader(url), autocommit=True) as reader:
        return reader.execute(sql).fetchall()


@pytest.mark.integration
def test_critical_anomalies_rule_fires_per_device(database: str) -> None:
    """One instance per device with critical anomalies stored in the last 5 minutes; warnings
    and older records do not count."""
    with psycopg.connect(database, autocommit=True) as conn:
        for device, severity, age_s, n in (
            ("d1", "critical", 30, 2),
            ("d2", "warning", 30, 3),
            ("d3", "critical", 900, 1),
        ):
            for i in range(n):
                conn.execute(
                    "INSERT INTO anomalies (device_id, value, z_score, severity, timestamp,"
                    " created_at, detector, score, threshold, channels, reason, model_version)"
                    " VALUES (%s, 1, 5, %s, now() - make_interval(secs => %s),"
                    " now() - make_interval(secs => %s), 'zscore', 5, 2.5, ARRAY['value'],"
                    " 'test', 0)",
                    (device, severity, age_s + i, age_s),
                )
    rule = _alert_rule("flead-critical-anomalies")
    (item,) = [d for d in rule["data"] if d["datasourceUid"] != "__expr__"]
    rows = _reader_query(database, _alert_sql(item, datetime.now(UTC)))
    assert rows == [("d1", 2)]
    kind, value = _threshold(rule)
    assert (kind, value) == ("gt", 0.0)


@pytest.mark.integration
def test_quality_drop_rule_compares_with_the_best_so_far(database: str) -> None:
    """The newest version's held-out and prequential F1 against the best of the versions
    before it: a drop beyond the margin fires, a drop within it or a new best does not."""
    rule = _alert_rule("flead-quality-drop")
    (item,) = [d for d in rule["data"] if d["datasourceUid"] != "__expr__"]
    kind, margin = _threshold(rule)
    assert kind == "gt" and 0 < margin < 1

    def summary(conn, version: int, f1: float) -> None:
        conn.execute(
            "INSERT INTO model_evaluation_summaries (model_version, samples, tp, fp, tn, fn,"
            " accuracy, precision, recall, f1, mcc, baseline_accuracy) VALUES"
            " (%s, 100, 1, 1, 97, 1, 0.98, 0.5, 0.5, %s, 0.5, 0.98)",
            (version, f1),
        )

    def prequential(conn, version: int, tp: int, fp: int, fn: int, tn: int = 500) -> None:
        conn.execute(
            "INSERT INTO prequential_evaluations (model_version, tp, fp, tn, fn)"
            " VALUES (%s, %s, %s, %s, %s)",
            (version, tp, fp, tn, fn),
        )

    def fired() -> dict[str, tuple[str, float]]:
        rows = _reader_query(database, _alert_sql(item, datetime.now(UTC)))
        return {
            source: (version, float(below)) for source, version, below in rows if below > margin
        }

    with psycopg.connect(database, autocommit=True) as conn:
        summary(conn, 1, 0.30)
        summary(conn, 2, 0.60)
        prequential(conn, 1, 40, 10, 10)  # F1 0.8
        prequential(conn, 2, 2, 1, 1, tn=10)  # too few samples to count
        assert fired() == {}  # held-out: v2 is the best so far; prequential: one version
        summary(conn, 3, 0.60 - margin / 2)
        prequential(conn, 3, 40, 12, 12)  # F1 0.77: within the margin
        assert fired() == {}
        summary(conn, 4, 0.60 - margin - 0.05)
        prequential(conn, 4, 10, 30, 30)  # F1 0.25
    result = fired()
    assert set(result) == {"held-out", "prequential"}
    assert result["held-out"][0] == "4"
    assert result["held-out"][1] == pytest.approx(margin + 0.05)
    assert result["prequential"] == ("4", pytest.approx(0.8 - 0.25))


def _fires(database: str, uid: str) -> float:
    """The rule's value now (its one row) as the read-only role sees it; it fires above the
    threshold."""
    rule = _alert_rule(uid)
    (item,) = [d for d in rule["data"] if d["datasourceUid"] != "__expr__"]
    ((value,),) = _reader_query(database, _alert_sql(item, datetime.now(UTC)))
    assert _threshold(rule) == ("gt", 0.0)
    return float(value)


@pytest.mark.integration
def test_restart_rule_fires_on_recent_restarts_only(database: str) -> None:
    assert _fires(database, "flead-service-restarts") == 0  # no data: one row, no alert
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO service_restarts (service, restarted_at)"
            " VALUES ('fedavg', now() - interval '1 hour')"
        )
        assert _fires(database, "flead-service-restarts") == 0  # too old
        for service in ("fedavg", "flink-job"):
            conn.execute(
                "INSERT INTO service_restarts (service, restarted_at)"
                " VALUES (%s, now() - interval '1 minute')",
                (service,),
            )
    assert _fires(database, "flead-service-restarts") == 2


@pytest.mark.integration
def test_lag_rule_fires_on_growing_or_stalled_lag_the_supervisor_reported_lately(
    database: str,
) -> None:
    def health(service: str, lag: int, growing: bool, stalled: bool, age_s: int) -> None:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO service_health (service, alive, lag, lag_growing, stalled,"
                " checked_at) VALUES (%s, true, %s, %s, %s, now() - make_interval(secs => %s))"
                " ON CONFLICT (service) DO UPDATE SET lag = EXCLUDED.lag,"
                " lag_growing = EXCLUDED.lag_growing, stalled = EXCLUDED.stalled,"
                " checked_at = EXCLUDED.checked_at",
                (service, lag, growing, stalled, age_s),
            )

    assert _fires(database, "flead-lag-growing") == 0
    health("anomaly-sink", 5_000, False, False, 5)  # lag, but shrinking or steady
    health("fedavg", 900, True, False, 600)  # growing, but the report is 10 minutes old
    assert _fires(database, "flead-lag-growing") == 0
    health("flink-job", 1_200, True, False, 5)
    assert _fires(database, "flead-lag-growing") == 1_200
    health("fedavg", 300, False, True, 5)  # stalled: lag and no committed progress
    health("flink-job", 0, False, False, 5)
    assert _fires(database, "flead-lag-growing") == 300


# --- the read-only role ---------------------------------------------------------------------


def _reader_password() -> str:
    """The role's password as ``flead up`` set it (generated into the state folder)."""
    return db.grafana_password(load_settings())


def _as_reader(url: str) -> str:
    parts = urlsplit(url)
    netloc = f"{READER}:{quote(_reader_password(), safe='')}@{parts.hostname}:{parts.port or 5432}"
    return parts._replace(netloc=netloc).geturl()


@pytest.mark.integration
def test_reader_role_reads_everything_and_writes_nothing(database: str) -> None:
    """A second database on the same server (the role exists already: the migration is
    idempotent per database); the role reads every table, including one created after the
    migration, and can write none."""
    with psycopg.connect(database, autocommit=True) as owner:
        owner.execute(READER_MIGRATION.read_text())  # applying it again changes nothing
        owner.execute("CREATE TABLE later_table (x integer)")
        owner.execute("INSERT INTO later_table VALUES (1)")
    with psycopg.connect(_as_reader(database), autocommit=True) as reader:
        for table in (*TABLES_READ, "later_table"):
            reader.execute(f"SELECT count(*) FROM {table}").fetchone()
        # First guard: the role's sessions are read-only by default.
        with pytest.raises(errors.ReadOnlySqlTransaction):
            reader.execute("INSERT INTO later_table VALUES (2)")
        # Second guard: with that switched off, the privileges still refuse every write.
        reader.execute("SET default_transaction_read_only = off")
        writes = [
            "INSERT INTO anomalies (device_id, value, z_score, severity, timestamp)"
            " VALUES ('d', 1, 3, 'warning', now())",
            "INSERT INTO later_table VALUES (2)",
            "UPDATE federated_models SET accuracy = 1",
            "DELETE FROM local_models",
            "TRUNCATE later_table",
        ]
        for statement in writes:
            with pytest.raises(errors.InsufficientPrivilege):
                reader.execute(statement)
