"""Mount options that shape the filesystem, and the attributes they give nodes."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from dgfs.fs.entries import NodeKind
from dgfs.rebuild import CHECKED_WHOLE_UP_TO


@dataclass(frozen=True)
class FsOptions:
    """Mount options that shape the filesystem's behaviour."""

    read_only: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    force_owner: bool = False  # uid=/gid= given: every file shows that owner
    umask: int = 0o022
    file_mode: int | None = None  # forced permission bits for files
    dir_mode: int | None = None  # forced permission bits for directories
    listing_ttl: float = 10.0
    upload_workers: int = 4
    upload_delay: float = 0.5
    sync_upload: bool = False  # close waits for the upload and reports its error
    # Files up to this size are verified whole on open (deltas: see CHECKED_WHOLE_UP_TO).
    verify_whole_below: int = CHECKED_WHOLE_UP_TO
    retry_delay: float = 2.0
    prefetch: int = 4  # deltas rebuilt ahead of a reader walking a directory (dgfs.fs.prefetch)

    def shown_attributes(
        self, kind: NodeKind, mode: int | None, uid: int | None, gid: int | None
    ) -> tuple[int, int, int]:
        """``(permission bits, uid, gid)`` a node of ``kind`` shows.

        ``mode``/``uid``/``gid`` are what is stored (None: nothing); the
        mount's defaults fill the gaps and its forced values win.
        """
        if kind is NodeKind.DIR:
            default_mode = 0o777 & ~self.umask
            forced = self.dir_mode
        elif kind is NodeKind.SYMLINK:
            default_mode, forced = 0o777, None
        else:
            default_mode = 0o666 & ~self.umask
            forced = self.file_mode
        shown_mode = (
            forced
            if forced is not None
            else (stat.S_IMODE(mode) if mode is not None else default_mode)
        )
        if self.force_owner:
            return shown_mode, self.uid, self.gid
        return (
            shown_mode,
            uid if uid is not None else self.uid,
            gid if gid is not None else self.gid,
        )
