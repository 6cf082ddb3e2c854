"""Telemetry out: system and model figures, presence and reported state over MQTT."""
