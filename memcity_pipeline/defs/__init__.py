"""Dagster wiring only: assets, asset checks, jobs, schedules, sensors and their metadata. Each
asset loads its inputs, calls a domain function, writes, and returns metadata."""
