"""Sensor fleet simulator: signal profiles, fleet, fault injection."""
