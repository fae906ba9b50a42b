"""Scheduler filters."""
