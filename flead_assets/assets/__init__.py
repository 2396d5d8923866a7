"""Assets: the streaming tier as external assets, the Spark-computed tables, the report, and
the Grafana dashboards, in lineage order."""
