"""``accuracy_report``: the per-version trend of held-out quality beside the majority baseline,
as the ``accuracy_reports`` table (for Grafana) and as a plot in the Dagster UI."""

import base64
import io

import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from flead_assets.assets.evaluations import GROUP, MODEL_EVALUATION_SUMMARIES
from flead_assets.resources.settings import FleadResource

_REPORT_COLUMNS = (
    "model_version",
    "samples",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "mcc",
    "baseline_accuracy",
    "detector",
)


def load_summaries(conn) -> pd.DataFrame:
    rows = conn.execute(
        f"SELECT {', '.join(_REPORT_COLUMNS)} FROM model_evaluation_summaries"
        " ORDER BY model_version"
    ).fetchall()
    report = pd.DataFrame(rows, columns=list(_REPORT_COLUMNS))
    numeric = [c for c in _REPORT_COLUMNS if c != "detector"]
    report[numeric] = report[numeric].apply(pd.to_numeric)
    return report


def store(conn, report: pd.DataFrame) -> None:
    """Upsert every version's row; drop rows of versions that no longer have a summary."""
    columns = ", ".join(_REPORT_COLUMNS)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _REPORT_COLUMNS[1:])
    with conn.transaction():
        with conn.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO accuracy_reports ({columns}) VALUES"
                f" ({', '.join(['%s'] * len(_REPORT_COLUMNS))})"
                f" ON CONFLICT (model_version) DO UPDATE SET {updates}, created_at = now()",
                [tuple(row) for row in report.itertuples(index=False)],
            )
        conn.execute(
            "DELETE FROM accuracy_reports WHERE model_version <> ALL(%s)",
            (report["model_version"].astype(int).tolist(),),
        )


def plot_markdown(report: pd.DataFrame) -> str:
    """The trend as an inline PNG (markdown), or a table where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display in a daemon
        import matplotlib.pyplot as plt
    except ImportError:
        return table_markdown(report)
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    for column, style in (
        ("accuracy", "-"),
        ("precision", "-"),
        ("recall", "-"),
        ("f1", "-"),
        ("mcc", "-"),
        ("baseline_accuracy", "--"),
    ):
        ax.plot(report["model_version"], report[column], style, label=column, linewidth=1.4)
    ax.set_xlabel("global version")
    ax.set_ylim(min(0.0, float(report["mcc"].min()) - 0.02), 1.02)
    ax.set_title("Held-out quality per global version (baseline: always the majority class)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)  # the middle band is empty: metrics hug 0 or 1
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"![accuracy trend](data:image/png;base64,{encoded})"


def table_markdown(report: pd.DataFrame, rows: int = 30) -> str:
    return report.tail(rows).to_markdown(index=False, floatfmt=".4f")


@asset(
    description="Per global version: held-out accuracy, precision, recall, F1, MCC, the"
    " detector and the majority-class baseline (table accuracy_reports), with the trend plotted.",
    deps=[MODEL_EVALUATION_SUMMARIES],
    kinds={"python", "postgres"},
    group_name=GROUP,
    metadata={"dagster/table_name": "public.accuracy_reports"},
)
def accuracy_report(context: AssetExecutionContext, flead: FleadResource) -> MaterializeResult:
    with flead.connect() as conn:
        report = load_summaries(conn)
        store(conn, report)
    context.log.info("accuracy report over %d versions", len(report))
    if report.empty:
        return MaterializeResult(metadata={"dagster/row_count": 0, "versions": 0})
    latest = report.iloc[-1]
    best = report.loc[report["f1"].idxmax()]
    return MaterializeResult(
        metadata={
            "dagster/row_count": len(report),
            "versions": len(report),
            "latest_version": int(latest["model_version"]),
            "latest_f1": float(latest["f1"]),
            "latest_mcc": float(latest["mcc"]) if pd.notna(latest["mcc"]) else None,
            "latest_accuracy": float(latest["accuracy"]),
            "latest_baseline_accuracy": float(latest["baseline_accuracy"]),
            "best_f1_version": int(best["model_version"]),
            "best_f1": float(best["f1"]),
            "trend": MetadataValue.md(plot_markdown(report)),
            "latest_versions": MetadataValue.md(table_markdown(report, rows=10)),
        }
    )
