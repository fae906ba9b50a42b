"""Nova compute side. ``driver`` (and ``config``) import Nova; every other
module here is plain Python the lab calls too, so one code path serves both."""
