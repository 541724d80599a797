"""The coordinator operator's CLI verbs: parse arguments, call the runtime, map errors to exit
codes.
"""
