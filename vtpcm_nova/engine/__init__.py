"""vtpcm-engine: host attestation, trust verdicts, migration bookkeeping."""
