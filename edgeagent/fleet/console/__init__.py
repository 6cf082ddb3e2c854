"""The fleet web console, served by ``edgeagent fleet serve`` beside its JSON API.

Plain files (HTML, JS, CSS) shipped as package data: no build step and nothing fetched from
elsewhere at run time. See ``docs/console.md``.
"""

from edgeagent.fleet.console.app import Console

__all__ = ["Console"]
