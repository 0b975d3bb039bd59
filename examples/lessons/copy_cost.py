"""What step 02 saves: slicing bytes (step 01) against deleting from a bytearray.

    python examples/lessons/copy_cost.py

Prints how long each takes to send a buffer away 64 KiB at a time.
"""

import time


def drain_bytes(size, chunk=65536):
    buf = b'x' * size
    while buf:
        buf = buf[chunk:]      # step 01: a new bytes object each time


def drain_bytearray(size, chunk=65536):
    buf = bytearray(size)
    while buf:
        del buf[:chunk]        # step 02: in place


if __name__ == '__main__':
    for size in (4 << 20, 16 << 20, 32 << 20):
        for drain in (drain_bytes, drain_bytearray):
            start = time.perf_counter()
            drain(size)
            took = time.perf_counter() - start
            print(f'{drain.__name__:16} {size >> 20:3d} MiB: {took:.3f} s')
