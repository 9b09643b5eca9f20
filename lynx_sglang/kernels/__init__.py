"""Triton kernels for the decode hot path, each beside (or importing) its torch reference.

Submodules are imported on use, so importing one kernel module does not build the others
(Triton decides at decoration time whether a kernel runs compiled or in its interpreter).
"""
