import importlib.util

# Files pytest must not import while collecting doctests: the MegEngine fixture scripts
# run only under the MegEngine oracle, and the torch worker only under a PyTorch python.
collect_ignore_glob = ["tests/fixtures/*", "volconv/bench/_torch_worker.py"]

# volconv.dask (and its doctests) needs the optional dask and zarr: skip it without them.
try:
    if importlib.util.find_spec("dask") is None or importlib.util.find_spec("zarr") is None:
        collect_ignore_glob.append("volconv/dask.py")
except ValueError:  # a module set to None in sys.modules
    collect_ignore_glob.append("volconv/dask.py")
