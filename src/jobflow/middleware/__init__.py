"""jobflow's Dramatiq middleware, one per module, and the stack they run in."""
