"""What a reload applies live and what it leaves for a restart."""

from __future__ import annotations

from typing import Any

from edgeagent.config import AgentConfig, parse_config
from edgeagent.service.reload import plan_reload


def _cfg(**sections: Any) -> AgentConfig:
    data: dict[str, Any] = {"models": [{"name": "a", "path": "a.onnx"},
                                       {"name": "b", "path": "b.onnx"}]}
    data.update(sections)
    return parse_config(data, {}, source="agent.toml")


def test_no_change() -> None:
    plan = plan_reload(_cfg(), _cfg())
    assert (plan.load, plan.unload, plan.limits, plan.restart_keys) == ((), (), (), ())
    assert plan.summary() == "no change"


def test_live_agent_keys_apply_and_the_rest_waits_for_a_restart() -> None:
    old = _cfg()
    new = _cfg(agent={"log_level": "debug", "shutdown_grace_s": 3, "state_dir": "/elsewhere"},
               http={"listen": "127.0.0.1:9000", "token_file": "/etc/t"},
               hub={"url": "file:///hub", "root": "/etc/root.json"},
               mqtt={"url": "mqtt://broker"})
    plan = plan_reload(old, new)
    assert plan.config.agent.log_level == "debug"
    assert plan.config.agent.shutdown_grace_s == 3
    assert plan.config.agent.state_dir == ""  # kept until a restart
    assert plan.config.http.listen == "127.0.0.1:8080"
    assert plan.config.hub.url == ""
    assert set(plan.restart_keys) == {"agent.state_dir", "http.listen", "http.token_file",
                                      "hub.url", "hub.root", "mqtt.url"}
    assert "needs a restart to apply: " in plan.summary()


def test_models_added_removed_changed_and_limits() -> None:
    old = _cfg()
    new = _cfg(models=[{"name": "a", "path": "a2.onnx"},
                       {"name": "c", "path": "c.onnx"}])
    plan = plan_reload(old, new)
    assert plan.load == ("a", "c")
    assert plan.unload == ("b",)
    assert plan.config.models == new.models

    limits = _cfg(models=[{"name": "a", "path": "a.onnx", "max_concurrency": 4},
                          {"name": "b", "path": "b.onnx"}])
    plan = plan_reload(old, limits)
    assert (plan.load, plan.unload, plan.limits) == ((), (), ("a",))
    assert plan.summary() == "new limits: a"
