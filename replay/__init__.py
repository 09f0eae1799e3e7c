"""Replays recorded (or synthetic) KPI traffic into Kafka, keyed by site (kafka-python producer)."""
