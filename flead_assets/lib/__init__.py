"""Plain Spark/pandas/PostgreSQL code behind the assets, free of Dagster.

Spark pickles the functions it runs on executors by reference, so they live in importable
modules that import only what a Python worker needs (numpy, pandas, psycopg, streaming.model).
"""
