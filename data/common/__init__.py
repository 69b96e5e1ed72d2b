"""The ground floor: what every package of the project may use, importing nothing of the project.

- :mod:`.registry`: :class:`Registry`, the one name -> object registry, and :class:`UnknownNameError`;
- :mod:`.atomic`: atomic writes of files and directories;
- :mod:`.errors`: :class:`UserError`, the base of every error caused by the user's input.
"""
from .atomic import (atomic_dir, atomic_file, atomic_path, fsync_path, fsync_tree, publish_dir, remove_temporaries,
                     temp_sibling, write_bytes, write_json, write_text)
from .errors import PathNotFoundError, UserError
from .registry import Registry, UnknownNameError

__all__ = ["Registry", "UnknownNameError", "UserError", "PathNotFoundError", "write_bytes", "write_text", "write_json",
           "atomic_file", "atomic_path", "atomic_dir", "publish_dir", "fsync_path", "fsync_tree", "temp_sibling",
           "remove_temporaries"]
