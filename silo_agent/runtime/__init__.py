"""The silo agent at run time: the runner loop, the round drivers, the local model."""
