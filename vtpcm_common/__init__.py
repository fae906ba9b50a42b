"""Pieces shared by the compute-node agent and the controller engine."""
