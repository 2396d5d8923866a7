"""Spark through dagster-pyspark: the master from the settings, the Kafka source from local jars."""

from __future__ import annotations

import os
import sys

from dagster_pyspark import LazyPySparkResource
from pyspark.sql import SparkSession

from flead.config import Settings


class SparkSetupError(RuntimeError):
    pass


def spark_config(settings: Settings) -> dict[str, str]:
    """Session options; ``spark.jars`` are the Kafka source's jars that Maven copied from
    ``jvm/pom.xml`` (profile ``spark``): local files, never resolved from a repository at run
    time."""
    scratch = settings.state_dir / "spark"
    jars = sorted((settings.jars_dir / "spark").glob("*.jar"))
    return {
        "spark.master": settings.spark_master,
        "spark.app.name": "flead",
        "spark.jars": ",".join(str(j) for j in jars),
        "spark.driver.memory": settings.spark_driver_memory,
        # A spark:// master (cluster mode): each executor's heap; unused by local[*].
        "spark.executor.memory": settings.spark_executor_memory,
        "spark.sql.shuffle.partitions": str(settings.spark_shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # The executors' Python must be this environment (pandas, pyarrow, the project).
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        # Runs are batch jobs under a daemon: no UI port, no progress bars in the run logs.
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.warehouse.dir": str(scratch / "warehouse"),
        "spark.local.dir": str(scratch / "tmp"),
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={scratch / 'derby'}",
    }


def pyspark_resource(settings: Settings) -> LazyPySparkResource:
    """Lazy: the session (a JVM) starts only when an asset asks for it, so a run that only
    reads PostgreSQL (the accuracy report) does not pay Spark's start-up."""
    return LazyPySparkResource(spark_config=spark_config(settings))


def session(resource: LazyPySparkResource) -> SparkSession:
    """The resource's session, after checking that the Kafka source is on its classpath (a
    missing jar otherwise surfaces as an obscure "Failed to find data source: kafka")."""
    if "spark-sql-kafka" not in resource.spark_config.get("spark.jars", ""):
        raise SparkSetupError(
            "no spark-sql-kafka jar in <state>/jars/spark; `make install` copies it with"
            " `mvn -f jvm/pom.xml -P spark dependency:copy-dependencies`"
        )
    # PySpark starts its Python workers with $PYSPARK_PYTHON (not the spark.pyspark.python
    # option), "python3" from PATH by default: that must be this environment.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return resource.spark_session
