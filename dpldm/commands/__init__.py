"""The drivers behind ``dpldm COMMAND``: each module's ``main(argv)`` (the library they call lives below)."""
