"""The coordinator at run time: the hub, its streams and the round driver thread."""
