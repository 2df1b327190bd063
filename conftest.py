# Files pytest must not import while collecting doctests: the MegEngine fixture scripts
# run only under the MegEngine oracle, and the torch worker only under a PyTorch python.
collect_ignore_glob = ["tests/fixtures/*", "volconv/bench/_torch_worker.py"]
