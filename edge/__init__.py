"""Edge agent: sensors, outbox (store-and-forward), flashing."""
