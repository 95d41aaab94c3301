"""Idempotent consumers: RabbitMQ -> time-series stores."""
