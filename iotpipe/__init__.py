"""iotpipe: the shared core (envelope, topics, settings, transports) and the ``iotpipe`` command."""

__version__ = "0.2.0"
