"""Replicas of a session that serve and learn together (docs/replicas.md).

plan: the pure decisions every member takes from the same exchange. rendezvous: who is in the group, over
torch.distributed's TCPStore. comms: the collectives (gloo process groups, JSON over them). digest: what
"same weights" means. state: the weights and optimizer state a joining member receives (and every member,
from one that restored or rolled back). inbox: what waits in a member for the group. settings: which group a
worker belongs to (its environment). runner: the group thread that the worker service hands its train,
configure, restore and rollback requests to.

Kept import-free here: the worker's batches module imports plan, which must not pull in torch.distributed.
"""
