"""rtgate backbone: the NATS contract (subjects, streams) and the broker service."""
