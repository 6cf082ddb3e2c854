"""Running as a service: systemd notify, signals, logging, unit files."""
