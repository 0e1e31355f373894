"""Exporters: read the monitor's transitions and state, never change them."""
