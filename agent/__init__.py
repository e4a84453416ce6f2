"""emotion-agent: facial-expression events from a camera, published to MQTT."""

__version__ = "0.1.0"
