"""nova-api side of the vTPCM: flavor extra spec validators (imports Nova)."""
