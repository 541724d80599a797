"""A tiny linear regression whose training runs in one process or on several workers."""
