"""The ground of beit-data: what every part may use, and which imports none of them.

- ``errors``: the project's one error type, ``BeitDataError``;
- ``location``: ``Location``, one kind of value for a local path, an object URL and a ``pipe:``
  command; redaction of credentials; names kept inside their folder;
- ``storage``: reading and listing any location; ``ranges``: reading byte ranges of many files;
- ``files``: atomic writes, writable folders, output checks, the run lock.

``beit_data``, ``beit_model``, ``pipelines`` and ``cli`` all build on it; it imports nothing of
theirs. This module is its face: the version and the names most code needs.
"""

from __future__ import annotations

from beit_common.errors import BeitDataError, os_error
from beit_common.files import (
    LOCK_NAME,
    describe_file,
    ensure_writable_dir,
    folder_lock,
    output_file,
    output_location,
    remove_stale_temps,
    remove_stale_uploads,
    save_atomic,
    write_atomic,
    write_text_atomic,
)
from beit_common.location import Location, redact, redacted, resolve_locations

__version__ = "0.1.0"

__all__ = ["__version__", "BeitDataError", "os_error", "Location", "resolve_locations", "redact", "redacted",
           "write_atomic", "write_text_atomic", "save_atomic", "ensure_writable_dir", "describe_file", "folder_lock",
           "LOCK_NAME", "output_location", "output_file", "remove_stale_temps", "remove_stale_uploads"]
