"""Nova side of vTPCM: engine, scheduler filter, compute driver."""
