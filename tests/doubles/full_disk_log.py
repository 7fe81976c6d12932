"""FullDiskLog: the real ResultLog on a regular file whose every write fails with ENOSPC, as on a full disk.

(/dev/full gave a real kernel ENOSPC, but a result log now refuses any path that is not a regular file.)"""
from __future__ import annotations

import errno
import os

from edge_runtime.outputs.result_log import ResultLog


class FullDiskLog(ResultLog):
    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
