"""The silo operator's CLI verbs."""
