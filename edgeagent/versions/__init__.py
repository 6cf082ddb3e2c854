"""Which version of each model serves, and why: the pure policy, the one owner that acts on it,
and the one persisted history (DESIGN 3.6)."""
