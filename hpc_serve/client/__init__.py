"""The login side after submission: status, cancel, logs, wait, tunnel and smoke, read from the registry."""
