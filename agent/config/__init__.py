"""The agent's configuration: one checked ``AgentConfig`` from its file, the environment and
the command line (``settings``), the files it names (``files``), the overrides
(``overrides``) and the cross-field checks (``checks``)."""
