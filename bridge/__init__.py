"""MQTT -> AMQP bridge and the embedded edge broker runner."""
