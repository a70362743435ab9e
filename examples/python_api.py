"""jupyter-gpu-attach from a plain Python script: ``lease`` and ``@remote``.

Run it with ``python examples/python_api.py``. With no GPU_ATTACH_BROKER_URL set it starts an
embedded broker and agent (simulated devices on a machine without an NVIDIA GPU), like a notebook.
"""

import numpy as np

import jupyter_gpu_attach as gpa


def scaled_sum(a, factor=1.0):
    """Runs on the GPU host: CuPy there (a NumPy stand-in on a simulated device)."""
    import cupy as cp

    return float((cp.asarray(a) * factor).sum())


@gpa.remote(memory="1GiB")
def normalise(a):
    import cupy as cp

    a = cp.asarray(a)
    return cp.asnumpy((a - a.mean()) / a.std())


if __name__ == "__main__":
    x = np.arange(1_000_000, dtype=np.float64)
    # The slice is leased for each call only: none is held between the two calls below.
    with gpa.lease(memory="2GiB") as g:
        print("sum:", g.run(scaled_sum, x))
        print("scaled sum:", g.run(scaled_sum, x, factor=0.5))
        print("ran on", g.last.lease["gpus"][0]["id"], "for", f"{g.last.timings['total'] * 1000:.1f} ms")
    z = normalise(x[:10])
    print("normalised:", type(z).__name__, z.round(3))
