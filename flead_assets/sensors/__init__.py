"""Sensors and schedules: new global versions, new readings, streaming health, the hourly run."""
