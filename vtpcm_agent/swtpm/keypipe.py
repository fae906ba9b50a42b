"""Hand a key to a child process through a pipe, never argv or a file."""

import os


def key_pipe(data: bytes) -> int:
    """Return the read end of a pipe that already holds ``data`` (then EOF).

    The caller passes it with ``pass_fds`` and closes it after the spawn.
    Keys are 32 bytes (64 as hex), far below the pipe buffer, so the write
    never blocks."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
    finally:
        os.close(write_fd)
    return read_fd
