"""Grafana dashboards for edgeagent: the JSON files beside this module (make.py writes them)."""
