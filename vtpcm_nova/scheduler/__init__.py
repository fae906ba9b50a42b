"""nova-scheduler side of the vTPCM (imports Nova)."""
