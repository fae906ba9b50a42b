"""The states of a vTPCM record besides the agents' own (ACTIVE, STOPPED),
shared by the coordinator and the shelving code."""

CREATING = "CREATING"
DESTROYING = "DESTROYING"
SHELVED = "SHELVED"
RESERVED_PREFIX = "creating-"
