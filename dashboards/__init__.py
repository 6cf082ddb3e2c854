"""Grafana dashboards for edgeagent (data: the JSON files beside this module; make.py writes them)."""
