"""Local directories: atomic files, the file-system calls in one seam (``FileOps``), a flock-guarded lease."""

from ml_playground.checkpoint.stores.local._fileops import FileOps
from ml_playground.checkpoint.stores.local._lease import WriterLease, lease_state
from ml_playground.checkpoint.stores.local._store import LocalStore

__all__ = ["FileOps", "LocalStore", "WriterLease", "lease_state"]
