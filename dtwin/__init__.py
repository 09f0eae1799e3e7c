"""dtwin: an AI-enabled network digital twin run as a Kafka/Faust closed-loop controller."""

__version__ = "0.1.0"
