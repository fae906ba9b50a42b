"""Contract of vtpcm-engine (topic vtpcm-engine): messages and client."""
