"""The vTPCM compute-node agent: one swtpm per VM, keys, association list, RPC."""
