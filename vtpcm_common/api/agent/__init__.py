"""Contract of vtpcm-agent (topic vtpcm-agent): messages and client."""
