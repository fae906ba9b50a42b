"""Engine persistence: SQLAlchemy models and typed access functions."""
