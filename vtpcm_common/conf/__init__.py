"""Options shared by the agent, the engine and their clients."""
