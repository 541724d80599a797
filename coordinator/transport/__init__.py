"""The only coordinator code that imports grpc: the servicer, the server builder, the status
client.
"""
