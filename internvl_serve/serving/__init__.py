"""Serving on Triton: the ensemble's contract (contract.py; its requests parsed by parsing.py against
limits.py), the Triton-free services the model repository's adapters call (preprocess.py, vision.py,
llm.py; device.py picks CUDA or CPU) and the server launcher (launcher.py: the CLI; triton_server.py:
tritonserver and its guards as processes).

Nothing here imports `triton_python_backend_utils`; importing this package stays light (no torch):
import the submodules you need.
"""
