"""The two round kinds and their events, pure: no gRPC, no files, no threads; time comes in as
`now`.
"""
