"""Fleet control in: desired state and commands over MQTT, and the fleet manager side."""
