"""The RPC contracts of the two services: message types and clients.

The agent, the engine and the Nova driver each import only this layer to
talk to one another, never each other's packages, so each can be upgraded
and deployed on its own.
"""
