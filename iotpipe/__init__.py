"""iotpipe: the shared core (envelope, topics, settings, transports) and the ``iotpipe`` command."""

__version__ = "0.1.0"
