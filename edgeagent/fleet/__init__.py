"""The fleet controller (``edgeagent fleet serve``) and the fleet manager's commands.

DESIGN 3.8: follows the fleet through MQTT 5 shared subscriptions, keeps the inventory and the
rollouts in a database (SQLite, or PostgreSQL for several replicas), drives staged rollouts
on the rollout documents of DESIGN 3.5 and serves a JSON API. See ``docs/fleet.md``.
"""

from edgeagent.fleet.config import FleetConfig, load_fleet_config, parse_fleet_config
from edgeagent.fleet.controller import FleetController

__all__ = ["FleetConfig", "FleetController", "load_fleet_config", "parse_fleet_config"]
