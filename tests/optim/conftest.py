"""The optimizer area: APOLLO (the paper's steps), stochastic rounding, the host-side plan, and the Triton
kernels. Pure computations, no processes; the kernels run under Triton's interpreter on CPU (in a child
process: tests/triton_helpers.py) and for real on CUDA (`gpu`). Nothing here is shared between its modules
yet: each keeps its own cases beside its own kernel."""
