"""FLEAD's Dagster code location: assets, sensors and resources (see ``definitions.py``)."""
